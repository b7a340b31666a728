"""Stages (one per expert of a model that switches transformers mid-run): nothing crosses a boundary."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import ClassVar

import pytest

from foresight import ConfigError, Controller, Policy, ReplayPolicy, load_trace, make_config, trace_to_json


def feed_run(ctrl: Controller, steps: int, mse_at) -> None:
    """Plan every step, observing ``mse_at(step, layer)`` for each measured layer."""
    for t in range(steps):
        plan = ctrl.plan(t)
        if plan.measure:
            ctrl.observe([[mse_at(t, layer)] * ctrl.num_probes for layer in plan.computed])


def mse_table(steps: int, layers: int, seed: int = 0):
    rng = random.Random(seed)
    table = [[rng.uniform(0.01, 2.0) for _ in range(layers)] for _ in range(steps)]
    return lambda t, layer: table[t][layer]


@pytest.mark.parametrize("policy", [make_config("foresight", warmup=3, recalculate=3, threshold=1.5),
                                    make_config("static", warmup=2, reuse=1, period=2)])
def test_a_staged_run_is_two_fresh_runs_back_to_back(policy):
    steps, boundary, layers = 14, 6, 4
    mse = mse_table(steps, layers)
    staged = Controller(policy, layers, 2)
    staged.reset(stages=(0, boundary))
    feed_run(staged, steps, mse)
    first, second = Controller(policy, layers, 2), Controller(policy, layers, 2)
    feed_run(first, boundary, mse)
    feed_run(second, steps - boundary, lambda t, layer: mse(t + boundary, layer))
    want = first.trace["steps"] + [{**s, "step": s["step"] + boundary} for s in second.trace["steps"]]
    trace = staged.trace
    assert trace["steps"] == want
    assert trace["stages"] == [0, boundary]
    # the second stage starts without the first's thresholds, and recomputes everything unmeasured
    assert trace["steps"][boundary]["computed"] == list(range(layers)) and not trace["steps"][boundary]["measure"]
    if policy.name == "foresight":
        assert trace["steps"][boundary]["thresholds"] is None
        assert trace["steps"][boundary - 1]["thresholds"] is not None
    assert staged.summary()["steps"] == steps


def test_a_single_stage_trace_has_no_stages_field_and_staged_ones_round_trip():
    ctrl = Controller(make_config("foresight", warmup=2, recalculate=2), 3, 1)
    feed_run(ctrl, 5, mse_table(5, 3))
    assert "stages" not in ctrl.trace
    ctrl.reset(stages=[0, 3])
    feed_run(ctrl, 5, mse_table(5, 3))
    text = trace_to_json(ctrl.trace)
    assert list(json.loads(text))[:6] == ["schema", "policy", "config", "num_layers", "num_probes", "stages"]
    assert load_trace(text) == ctrl.trace


@pytest.mark.parametrize("stages", [[1, 3], [0, 3, 3], [0, 4, 2], "0", [0, True], []])
def test_bad_stages_are_refused(stages):
    ctrl = Controller(make_config("none"), 2, 1)
    with pytest.raises(ValueError, match="stages"):
        ctrl.reset(stages=stages)
    trace = {**ctrl.trace, "stages": stages}
    with pytest.raises(ValueError, match="stages"):
        load_trace(json.dumps(trace))


@pytest.mark.parametrize("decision", [(1, False), (0, True)])
def test_a_policy_that_reuses_or_measures_at_a_stage_start_is_stopped(fresh_registry, decision):
    @dataclass(frozen=True)
    class Careless(Policy):
        """Computes step 0 of the run, then ignores stages."""

        name: ClassVar[str] = "careless"

        def decide(self, step, state):
            return (0, False) if step + state.stage_start == 0 else decision

    ctrl = Controller(Careless(), 2, 1)
    ctrl.reset(stages=(0, 1))
    ctrl.plan(0)
    with pytest.raises(ValueError, match="first of its stage"):
        ctrl.plan(1)


def test_replay_follows_a_staged_trace_and_refuses_other_stages():
    policy = make_config("foresight", warmup=2, recalculate=3, threshold=2.0)
    ctrl = Controller(policy, 3, 1)
    ctrl.reset(stages=(0, 5))
    feed_run(ctrl, 9, mse_table(9, 3, seed=4))
    trace = load_trace(trace_to_json(ctrl.trace))
    replay = ReplayPolicy.from_trace(trace)
    assert replay.stages == (0, 5)
    replay.check_run(3, 9, (0, 5))
    with pytest.raises(ConfigError, match=r"stages \(experts\) begin at steps \[0, 5\], this run's at \[0\]"):
        replay.check_run(3, 9, (0,))
    again = Controller(replay, 3, 1)
    again.reset(stages=(0, 5))
    feed_run(again, 9, mse_table(9, 3, seed=4))
    assert [s["computed"] for s in again.trace["steps"]] == [s["computed"] for s in trace["steps"]]
    assert [s["measure"] for s in again.trace["steps"]] == [s["measure"] for s in trace["steps"]]


def test_replay_refuses_a_trace_that_reuses_where_a_stage_begins():
    decisions = ((0, False), (0, True), (2, False), (0, False))
    with pytest.raises(ConfigError, match="where a stage begins"):
        ReplayPolicy(decisions, 2, (0, 2))
    with pytest.raises(ConfigError, match="ascending steps"):
        ReplayPolicy(decisions, 2, (0, 7))
    assert ReplayPolicy(decisions, 2, (0, 3)).stages == (0, 3)
