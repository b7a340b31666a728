"""Synthetic mse feeds with hand-computed plans. A plan is written as
(start, source, measure); with L layers, start == L means the whole stack is reused."""

import ast
import pathlib
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

import foresight
from foresight import (
    ConfigError,
    Controller,
    ControllerState,
    ForesightConfig,
    NoneConfig,
    Policy,
    StaticConfig,
    StepPlan,
    make_controller,
)

ALL = (0, None, False)  # compute everything, measure nothing
FULL = (0, None, True)  # compute everything, measure every layer


def brief(plan):
    return plan.start, plan.source, plan.measure


def run(ctrl, feed):
    """Plan steps 0..len(feed)-1; feed[t] is the mse handed to observe() when the plan measures."""
    plans = []
    for t, mse in enumerate(feed):
        plan = ctrl.plan(t)
        plans.append(brief(plan))
        if plan.measure:
            assert mse is not None, f"step {t} measures but the feed has no mse"
            ctrl.observe(mse)
        else:
            assert mse is None, f"step {t} does not measure but the feed has mse"
    return plans


# --- none -------------------------------------------------------------------------------


def test_none_computes_everything_every_step():
    ctrl = make_controller("none", 3, 2)
    assert run(ctrl, [None] * 6) == [ALL] * 6
    assert ctrl.summary() == {"layer_calls": 18, "layer_calls_skipped": 0, "steps": 6}
    with pytest.raises(RuntimeError, match="observe"):
        ctrl.observe([[0.0, 0.0]] * 3)


# --- static -----------------------------------------------------------------------------

REUSE_3x2 = (3, (2, 1), False)  # L=3, P=2: feed the head from layer 2's last probe


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # W=4, N=1, R=2: warm start, cache filled at step 3, then reuse every other step.
        (StaticConfig(4, 1, 2), [ALL, ALL, ALL, ALL, ALL, REUSE_3x2, ALL, REUSE_3x2, ALL, REUSE_3x2]),
        # W=2, N=2, R=3: phase = (t-2) % 3; phases 1 and 2 reuse.
        (StaticConfig(2, 2, 3), [ALL, ALL, ALL, REUSE_3x2, REUSE_3x2, ALL, REUSE_3x2, REUSE_3x2, ALL]),
        # W=1, N=1, R=3: the very first step fills the cache.
        (StaticConfig(1, 1, 3), [ALL, ALL, ALL, REUSE_3x2, ALL, ALL, REUSE_3x2]),
    ],
)
def test_static_schedule(cfg, expected):
    ctrl = Controller(cfg, 3, 2)
    assert run(ctrl, [None] * len(expected)) == expected
    reused = expected.count(REUSE_3x2)
    assert ctrl.summary() == {"layer_calls": 3 * (len(expected) - reused), "layer_calls_skipped": 3 * reused, "steps": len(expected)}


def test_static_never_measures():
    ctrl = make_controller("static", 2, 1, warmup=1)
    ctrl.plan(0)
    with pytest.raises(RuntimeError):
        ctrl.observe([[0.0]] * 2)


# --- foresight: one scripted generation ---------------------------------------------------
# L=4 layers, P=2 probes (spatial, temporal), W=3, R=2, gamma=0.5.
# Calibration at t=2 gives thresholds [[.5,.5],[1,1],[2,2],[4,4]].

L, P = 4, 2
CAL = [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]]
THR = [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]
# layer 0 reusable (spatial 0.4 <= .5), layer 1 not, layer 2 reusable only through its
# spatial probe (1.0 <= 2, temporal 9 > 2), layer 3 not.
MIXED = [[0.4, 9.0], [5.0, 5.0], [1.0, 9.0], [9.0, 9.0]]
FEED = [
    None,  # t=0: warmup, nothing kept
    None,  # t=1 = W-2: fill caches
    CAL,  # t=2 = W-1: calibrate
    MIXED,  # t=3: calibration mse is above every threshold -> full compute
    MIXED,  # t=4: forced recompute (4 % 2 == 0)
    [[9.0, 3.0]],  # t=5: deepest reusable layer is 2 -> only layer 3 runs; temporal 3 <= 4
    [[0.1, 0.1], [5.0, 5.0], [0.1, 0.1], [0.1, 0.1]],  # t=6: forced recompute
    None,  # t=7: every layer reusable -> skip the whole stack
    [[0.1, 0.1], [0.1, 0.1], [9.0, 9.0], [9.0, 9.0]],  # t=8: forced recompute
    [[9.0, 9.0], [9.0, 9.0]],  # t=9: layers 0..1 reusable -> layers 2, 3 run
]
EXPECTED = [
    ALL,
    ALL,
    FULL,
    FULL,
    FULL,
    (3, (2, 1), True),
    FULL,
    (4, (3, 1), False),
    FULL,
    (2, (1, 1), True),
]


def scripted():
    ctrl = make_controller("foresight", L, P, warmup=3, recalculate=2, threshold=0.5)
    return ctrl, run(ctrl, FEED)


def test_foresight_scripted_plans():
    assert scripted()[1] == EXPECTED


def test_foresight_warmup_flags_and_calibration():
    ctrl, _ = scripted()
    steps = ctrl.trace["steps"]
    assert [s["computed"] for s in steps[:3]] == [[0, 1, 2, 3]] * 3
    assert [s["measure"] for s in steps[:3]] == [False, False, True]
    # Thresholds in force when each step was planned: none until calibration at W-1.
    assert [s["thresholds"] for s in steps[:3]] == [None] * 3
    assert all(s["thresholds"] == THR for s in steps[3:])
    assert steps[2]["mse"] == CAL


def test_foresight_trace_mse_only_where_measured():
    steps = scripted()[0].trace["steps"]
    assert steps[5]["mse"] == [[None, None]] * 3 + [[9.0, 3.0]]
    assert steps[7]["mse"] == [[None, None]] * 4
    assert steps[9]["mse"] == [[None, None]] * 2 + [[9.0, 9.0]] * 2
    assert [s["source"] for s in steps] == [None] * 5 + [[2, 1], None, [3, 1], None, [1, 1]]


def test_foresight_summary_counts():
    # computed per step: 4,4,4,4,4,1,4,0,4,2 -> 31 run, 9 skipped
    assert scripted()[0].summary() == {"layer_calls": 31, "layer_calls_skipped": 9, "steps": 10}


def test_warmup_2_fills_at_step_0_and_calibrates_at_step_1():
    ctrl = make_controller("foresight", 2, 1, warmup=2, recalculate=100, threshold=1.0)
    assert run(ctrl, [None, [[1.0], [1.0]], None]) == [ALL, FULL, (2, (1, 0), False)]


def test_calibration_thresholds_are_gamma_times_mse():
    ctrl = make_controller("foresight", 2, 2, warmup=4, threshold=0.25)
    run(ctrl, [None, None, None, [[2.0, 4.0], [0.0, 8.0]]])
    ctrl.plan(4)
    assert ctrl.trace["steps"][4]["thresholds"] == [[0.5, 1.0], [0.0, 2.0]]


def test_forced_recompute_even_when_everything_is_reusable():
    # gamma=1: the calibration mse equals its threshold, so every layer is reusable, except
    # that every step with t % 3 == 0 recomputes all.
    ctrl = make_controller("foresight", 2, 1, warmup=2, recalculate=3, threshold=1.0)
    same = [[1.0], [1.0]]
    skip = (2, (1, 0), False)
    assert run(ctrl, [None, same, None, same, None, None, same]) == [ALL, FULL, skip, FULL, skip, skip, FULL]


# --- foresight: the reuse decision ------------------------------------------------------


def decide_after(mse, num_probes=1):
    """Calibrate L=len(mse) layers to thresholds of 1.0 (gamma=1), observe `mse` at a forced
    recompute, and return the brief plan of the next (free) step."""
    n = len(mse)
    ctrl = make_controller("foresight", n, num_probes, warmup=2, recalculate=2, threshold=1.0)
    run(ctrl, [None, [[1.0] * num_probes] * n, mse])
    return brief(ctrl.plan(3))


def test_deepest_reusable_layer_decides():
    # layer 2 reusable but layer 1 not: skip 0..2 anyway, since layer 1's output is not used.
    assert decide_after([[9.0], [9.0], [0.5], [9.0]]) == (3, (2, 0), True)
    assert decide_after([[0.5], [9.0], [9.0], [9.0]]) == (1, (0, 0), True)


def test_all_reusable_feeds_the_head_from_last_layer_last_probe():
    assert decide_after([[0.5, 9.0]] * 3, num_probes=2) == (3, (2, 1), False)


def test_none_reusable_computes_everything():
    assert decide_after([[1.5], [9.0], [1.01]]) == FULL


def test_threshold_is_inclusive():
    assert decide_after([[9.0], [1.0]]) == (2, (1, 0), False)


def test_any_probe_under_threshold_makes_a_layer_reusable():
    # temporal probe (1) under threshold, spatial (0) not -> reusable; and vice versa.
    assert decide_after([[9.0, 0.5], [9.0, 9.0]], num_probes=2) == (1, (0, 1), True)
    assert decide_after([[0.5, 9.0], [9.0, 9.0]], num_probes=2) == (1, (0, 1), True)
    assert decide_after([[9.0, 9.0], [9.0, 9.0]], num_probes=2) == FULL


def test_skipped_layers_keep_their_mse_and_computed_layers_update():
    # R is large so no forced recompute interferes: every decision after t=2 comes from
    # the latest mse, which is stale exactly for the layers that were skipped.
    ctrl = make_controller("foresight", 4, 1, warmup=2, recalculate=1000, threshold=0.5)
    feed = [
        None,
        [[1.0]] * 4,  # t=1: thresholds 0.5
        [[0.1], [0.1], [1.0], [1.0]],  # t=2: mse 1.0 > 0.5 everywhere -> full; now k=1
        [[0.1], [1.0]],  # t=3: layers 2, 3 run; layer 2 becomes reusable
        [[0.2]],  # t=4: only layer 3 runs and becomes reusable
        None,  # t=5: everything reusable
        None,  # t=6: nothing was measured, so the same decision again
    ]
    assert run(ctrl, feed) == [ALL, FULL, FULL, (2, (1, 0), True), (3, (2, 0), True), (4, (3, 0), False), (4, (3, 0), False)]
    assert ctrl.summary() == {"layer_calls": 4 * 3 + 2 + 1, "layer_calls_skipped": 2 + 3 + 4 + 4, "steps": 7}


# --- per-generation state -----------------------------------------------------------------


def test_reset_makes_the_second_generation_identical_to_the_first():
    # The reference never resets: its second video skips warmup and calibration.
    ctrl, plans = scripted()
    first = ctrl.trace
    ctrl.reset()
    assert ctrl.trace["steps"] == [] and ctrl.summary() == {"layer_calls": 0, "layer_calls_skipped": 0, "steps": 0}
    assert run(ctrl, FEED) == plans
    assert ctrl.trace == first


def test_without_reset_a_new_generation_is_refused():
    ctrl, _ = scripted()
    with pytest.raises(RuntimeError, match=r"plan\(0\) out of order: expected step 10; call reset\(\)"):
        ctrl.plan(0)


def test_out_of_order_plan_raises():
    ctrl = make_controller("none", 2, 1)
    with pytest.raises(RuntimeError, match="expected step 0"):
        ctrl.plan(1)
    ctrl.plan(0)
    with pytest.raises(RuntimeError, match="expected step 1"):
        ctrl.plan(0)
    with pytest.raises(RuntimeError, match="expected step 1"):
        ctrl.plan(2)
    with pytest.raises(RuntimeError, match="expected step 1"):
        ctrl.plan(True)


def test_plan_after_unobserved_measurement_raises():
    ctrl = make_controller("foresight", 2, 1, warmup=2)
    ctrl.plan(0)
    assert ctrl.plan(1).measure
    with pytest.raises(RuntimeError, match="step 1 asked for measurement but observe"):
        ctrl.plan(2)


def test_observe_only_once_and_only_when_measured():
    ctrl = make_controller("foresight", 2, 1, warmup=2)
    ctrl.plan(0)  # W-2: fills the caches but does not measure
    with pytest.raises(RuntimeError, match="measure=True"):
        ctrl.observe([[0.0], [0.0]])
    ctrl.plan(1)
    ctrl.observe([[0.0], [0.0]])
    with pytest.raises(RuntimeError, match="measure=True"):
        ctrl.observe([[0.0], [0.0]])


@pytest.mark.parametrize(
    "mse, needle",
    [
        ([[1.0, 1.0]] * 2, r"step 1: got mse for 2 layers, expected 3 \(layers 0..2\)"),
        ([[1.0, 1.0]] * 4, "got mse for 4 layers, expected 3"),
        ([[1.0, 1.0], [1.0], [1.0, 1.0]], "step 1, layer 1: got 1 probe mse values, expected 2"),
        ([[1.0, 1.0], [1.0, 1.0], [1.0, float("nan")]], "step 1, layer 2, probe 1: mse must be a finite number >= 0 .got nan"),
        ([[-1e-9, 1.0], [1.0, 1.0], [1.0, 1.0]], "step 1, layer 0, probe 0: mse must be a finite number >= 0"),
        ([[1.0, 1.0], [float("inf"), 1.0], [1.0, 1.0]], "step 1, layer 1, probe 0: .* .got inf"),
        ([[1.0, "1.0"], [1.0, 1.0], [1.0, 1.0]], "layer 0, probe 1"),
        ([[1.0, None], [1.0, 1.0], [1.0, 1.0]], "layer 0, probe 1"),
    ],
)
def test_observe_validates_and_a_rejected_call_changes_nothing(mse, needle):
    ctrl = make_controller("foresight", 3, 2, warmup=2)
    ctrl.plan(0)
    ctrl.plan(1)
    with pytest.raises(ValueError, match=needle):
        ctrl.observe(mse)
    assert ctrl.trace["steps"][1]["mse"] == [[None, None]] * 3
    ctrl.observe([[0.0, 1.0]] * 3)  # the retry is accepted
    assert ctrl.trace["steps"][1]["mse"] == [[0.0, 1.0]] * 3


def test_observe_accepts_ints_and_tuples():
    ctrl = make_controller("foresight", 2, 2, warmup=2)
    ctrl.plan(0)
    ctrl.plan(1)
    ctrl.observe(((0, 1), (2, 3)))
    assert ctrl.trace["steps"][1]["mse"] == [[0.0, 1.0], [2.0, 3.0]]


# --- construction -------------------------------------------------------------------------


def test_make_controller_from_config_with_overrides():
    ctrl = make_controller(ForesightConfig(warmup=5, threshold=0.25), 2, 1, threshold=1.0, warmup=None)
    assert ctrl.config == ForesightConfig(warmup=5, threshold=1.0)
    assert make_controller(StaticConfig(reuse=2, period=3), 2, 1).config == StaticConfig(reuse=2, period=3)
    with pytest.raises(ConfigError, match="threshold does not apply to policy 'none'"):
        make_controller(NoneConfig(), 2, 1, threshold=0.5)


@pytest.mark.parametrize("num_layers, num_probes", [(0, 1), (2, 0), (2.0, 1), (True, 1)])
def test_controller_rejects_bad_sizes(num_layers, num_probes):
    with pytest.raises(ValueError, match="must be an int >= 1"):
        Controller(NoneConfig(), num_layers, num_probes)


def test_controller_rejects_non_config():
    with pytest.raises(TypeError, match="make_config"):
        Controller({"policy": "none"}, 2, 1)


def test_step_plan_ranges():
    plan = StepPlan(step=5, start=2, source=(1, 1), measure=True, num_layers=4)
    assert plan.computed == range(2, 4) and plan.skipped == range(0, 2)
    everything = StepPlan(step=0, start=0, source=None, measure=False, num_layers=4)
    assert list(everything.skipped) == [] and list(everything.computed) == [0, 1, 2, 3]


# --- the controller applies whatever policy it is given ------------------------------------


def test_controller_hands_the_policy_its_state_and_follows_it(fresh_registry):
    seen = []

    @dataclass(frozen=True)
    class SkipFirst(Policy):
        """Step 0 fills the caches, step 1 measures every layer and calibrates with gamma 2; later
        steps skip layer 0."""

        name: ClassVar[str] = "skip-first"

        def decide(self, step, state):
            seen.append(state)
            return (0, False) if step == 0 else (0, True) if step == 1 else (1, True)

        def calibration(self, step):
            return 2.0 if step == 1 else None

    ctrl = make_controller("skip-first", 2, 2)
    # The controller, not the policy, picks the source: layer 0's last probe feeds layer 1.
    assert run(ctrl, [None, [[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0]], [[7.0, 8.0]]]) == \
        [(0, None, False), FULL, (1, (0, 1), True), (1, (0, 1), True)]
    assert seen[1] == ControllerState(2, 2, (None, None), None)
    assert seen[2] == ControllerState(2, 2, ((1.0, 2.0), (3.0, 4.0)), ((2.0, 4.0), (6.0, 8.0)))
    assert seen[3].mse == ((1.0, 2.0), (5.0, 6.0))  # skipped layer 0 keeps its mse
    assert ctrl.trace["steps"][3]["thresholds"] == [[2.0, 4.0], [6.0, 8.0]]
    assert ctrl.trace["config"] == {"policy": "skip-first"}


@pytest.mark.parametrize("decision", [(3, False), (-1, False), (1.0, False), (2, True), (0, 1), (1, False),
                                      (0, True)])
def test_an_impossible_decision_is_a_policy_bug(fresh_registry, decision):
    @dataclass(frozen=True)
    class Broken(Policy):
        name: ClassVar[str] = "broken"

        def decide(self, step, state):
            return decision

    with pytest.raises(ValueError, match="policy 'broken' decided"):
        make_controller("broken", 2, 1).plan(0)


# --- purity -------------------------------------------------------------------------------


def test_foresight_imports_only_the_standard_library():
    package = pathlib.Path(foresight.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue  # relative imports stay inside the package
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names, f"{path.name} imports {name}"
