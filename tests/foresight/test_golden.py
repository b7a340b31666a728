"""Golden traces: every decision a saved trace records must be made again, exactly.

Each trace in tests/golden/ (synthetic ones from make_synthetic.py, real runs recorded by the
runtime) is replayed: a fresh controller built from its header is fed its recorded mse, and
every step's computed layers, source, measure flag and thresholds must equal the recorded
ones bit for bit. The hand-written cases below go through the same replay; their expected
decisions are worked out from docs/foresight-algorithm.md, not from the code, so
the goldens are tied to the documented semantics and not only to what the code does today.
"""

import copy
import pathlib

import pytest

from foresight import load_trace, make_controller, trace_to_json
from tests.golden import make_synthetic

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden"
FILES = sorted(GOLDEN.glob("*.json"))


def replay(trace: dict) -> None:
    """Feed `trace`'s recorded mse through a fresh controller and check it decides the same."""
    options = dict(trace["config"])
    ctrl = make_controller(options.pop("policy"), trace["num_layers"], trace["num_probes"], **options)
    ctrl.reset(stages=trace.get("stages", [0]))  # a two-expert model's run: one stage per expert
    for want in trace["steps"]:
        t = want["step"]
        plan = ctrl.plan(t)
        got = {"computed": list(plan.computed), "source": plan.source and list(plan.source), "measure": plan.measure}
        assert got == {k: want[k] for k in got}, f"step {t}: decided {got}, the trace recorded otherwise"
        if plan.measure:
            ctrl.observe(want["mse"][plan.start:])
    for got, want in zip(ctrl.trace["steps"], trace["steps"]):
        assert got["thresholds"] == want["thresholds"], f"step {got['step']}: thresholds differ"
    assert ctrl.trace == trace  # header and the mse record too


# --- hand-computed cases --------------------------------------------------------------------
# A step is (computed, source, mse of the computed layers or None when not measured, thresholds).


def hand_trace(config: dict, num_layers: int, num_probes: int, steps: list) -> dict:
    rows = []
    for t, (computed, source, mse, thresholds) in enumerate(steps):
        full = [[None] * num_probes for _ in range(num_layers)]
        if mse is not None:
            full[computed[0]:] = mse
        rows.append({"step": t, "computed": computed, "source": source, "measure": mse is not None,
                     "mse": full, "thresholds": thresholds})
    trace = {"schema": "foresight-trace/2", "policy": config["policy"], "config": config,
             "num_layers": num_layers, "num_probes": num_probes, "steps": rows}
    return load_trace(trace_to_json(trace))  # a hand trace must be a valid file too


ALL3 = [0, 1, 2]
CAL = [[2.0, 4.0], [2.0, 2.0], [8.0, 1.0]]
THR = [[1.0, 2.0], [1.0, 1.0], [4.0, 0.5]]  # gamma 0.5 * CAL
BIG = [[9.0, 9.0]] * 3

HAND = {
    # 3 layers x (spatial, temporal), W=3, R=3, gamma=0.5.
    "hand-foresight-3x2": hand_trace({"policy": "foresight", "warmup": 3, "recalculate": 3, "threshold": 0.5}, 3, 2, [
        (ALL3, None, None, None),  # t=0 < W: compute every layer
        (ALL3, None, None, None),  # t=1 = W-2: fill every cache
        (ALL3, None, CAL, None),  # t=2 = W-1: measure; thr = 0.5 * mse, in force from t=3
        (ALL3, None, [[0.5, 9.0], [9.0, 9.0], [9.0, 9.0]], THR),  # t=3: 3 % R == 0 -> every layer
        # t=4: only layer 0 reusable (0.5 <= 1) -> k=0: start from cache[0][last probe], run 1..2.
        # Layer 1 becomes reusable through its temporal probe (1.0 <= 1: the threshold is
        # inclusive), layer 2 through its temporal one (0.5 <= 0.5).
        ([1, 2], [0, 1], [[9.0, 1.0], [9.0, 0.5]], THR),
        ([], [2, 1], None, THR),  # t=5: k = L-1: skip the stack, the head reads cache[2][last probe]
        (ALL3, None, [[9.0, 9.0], [9.0, 9.0], [1.0, 9.0]], THR),  # t=6: 6 % R == 0; layer 2 spatial 1 <= 4
        ([], [2, 1], None, THR),  # t=7: only layer 2 reusable, but the deepest decides: skip all
        ([], [2, 1], None, THR),  # t=8: skipped layers keep their mse -> the same decision
        (ALL3, None, BIG, THR),  # t=9: 9 % R == 0
        (ALL3, None, [[0.5, 9.0], [9.0, 9.0], [9.0, 9.0]], THR),  # t=10: nothing reusable (k=-1): all, measured
        ([1, 2], [0, 1], [[9.0, 9.0], [9.0, 9.0]], THR),  # t=11: layer 0 reusable again -> run 1..2
    ]),
    # One probe per layer (CogVideoX), the shortest warmup: W-2 = 0 fills, W-1 = 1 calibrates.
    "hand-foresight-2x1-warmup2": hand_trace({"policy": "foresight", "warmup": 2, "recalculate": 100, "threshold": 1.0}, 2, 1, [
        ([0, 1], None, None, None),
        ([0, 1], None, [[1.0], [1.0]], None),
        ([], [1, 0], None, [[1.0], [1.0]]),  # mse == threshold everywhere: reuse the whole stack
    ]),
    # Static, W=1, N=2, R=3: after the warm start, each period of 3 computes once, then reuses twice.
    "hand-static-3x2": hand_trace({"policy": "static", "warmup": 1, "reuse": 2, "period": 3}, 3, 2, [
        (ALL3, None, None, None),  # t=0: warm start
        (ALL3, None, None, None),  # t=1: period 1 computes
        ([], [2, 1], None, None),  # t=2, 3: reuse the whole stack output
        ([], [2, 1], None, None),
        (ALL3, None, None, None),  # t=4: period 2
        ([], [2, 1], None, None),
        ([], [2, 1], None, None),
    ]),
    # None is full compute: every layer, every step, nothing measured.
    "hand-none-3x2": hand_trace({"policy": "none"}, 3, 2, [(ALL3, None, None, None)] * 3),
}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_golden_file_replays(path):
    replay(load_trace(path.read_text()))


@pytest.mark.parametrize("name", HAND)
def test_hand_computed_case_replays(name):
    replay(HAND[name])


def test_replay_catches_a_changed_decision():
    trace = copy.deepcopy(HAND["hand-foresight-3x2"])
    trace["steps"][7]["computed"] = [2]
    with pytest.raises(AssertionError, match="step 7: decided"):
        replay(trace)


def test_synthetic_goldens_cover_every_model_and_policy():
    names = {p.name for p in FILES}
    assert {f"synthetic-{m}-{p}.json" for m in make_synthetic.MODELS for p in make_synthetic.DECIDING} <= names


def test_synthetic_foresight_goldens_hold_every_kind_of_free_step():
    # Free steps (calibrated, not forced to recompute) must show all three outcomes of the
    # deepest-reusable-layer rule, or the goldens would pin too little.
    kinds = set()
    for name in [f"synthetic-{m}-foresight" for m in make_synthetic.MODELS] + ["synthetic-latte-foresight-reference"]:
        trace = load_trace((GOLDEN / f"{name}.json").read_text())
        L, R = trace["num_layers"], trace["config"]["recalculate"]
        for s in trace["steps"]:
            if s["thresholds"] is not None and s["step"] % R:
                n = len(s["computed"])
                kinds.add("stack reused" if n == 0 else "all computed" if n == L else "prefix skipped")
    assert kinds == {"stack reused", "all computed", "prefix skipped"}


def test_synthetic_goldens_are_what_the_generator_writes():
    # Fails when the generator, a preset's shape or defaults, or the controller changed:
    # check why, then regenerate with `python -m tests.golden.make_synthetic`.
    for name, text in make_synthetic.traces().items():
        assert (GOLDEN / name).read_text() == text, f"{name} is stale; run python -m tests.golden.make_synthetic"
