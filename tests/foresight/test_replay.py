"""The replay policy follows a saved trace's decisions exactly and refuses runs it cannot follow."""

from __future__ import annotations

from pathlib import Path

import pytest

from foresight import ConfigError, Controller, ReplayPolicy, load_trace, make_config

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.stem)
def test_replaying_a_trace_gives_its_decisions(path):
    trace = load_trace(path.read_text())
    policy = ReplayPolicy.from_trace(trace)
    controller = Controller(policy, trace["num_layers"], trace["num_probes"])
    controller.reset(stages=trace.get("stages", [0]))
    for step in trace["steps"]:
        plan = controller.plan(step["step"])
        assert (list(plan.computed), list(plan.source) if plan.source else None, plan.measure) == \
            (step["computed"], step["source"], step["measure"])
        if plan.measure:
            controller.observe([step["mse"][layer] for layer in plan.computed])
    assert [s["computed"] for s in controller.trace["steps"]] == [s["computed"] for s in trace["steps"]]


def test_replay_refuses_other_layer_and_step_counts():
    policy = ReplayPolicy(((0, False), (0, True), (3, False)), num_layers=3)
    policy.check_run(3, 3)
    with pytest.raises(ConfigError, match="3-layer model and these engines have 4"):
        policy.check_run(4, 3)
    with pytest.raises(ConfigError, match="pass --steps 3"):
        policy.check_run(3, 5)
    with pytest.raises(ConfigError, match="3-layer"):
        Controller(policy, 4, 1).plan(0)


@pytest.mark.parametrize("decisions", [((4, False),), ((-1, False),), ((3, True),), ((True, False),), ((0, 1),)])
def test_replay_refuses_decisions_no_trace_makes(decisions):
    with pytest.raises(ConfigError, match="replay decision"):
        ReplayPolicy(decisions, num_layers=3)


def test_replay_needs_a_trace():
    with pytest.raises(ConfigError, match="--trace"):
        make_config("replay")
    assert ReplayPolicy([[0, False], [1, True]], 2) == ReplayPolicy(((0, False), (1, True)), 2)
