"""The layer-reuse controller: a pure state machine, floats in, a plan out.

Per step, the runtime asks ``plan(step)`` before running any engine, follows the plan,
and (only when ``plan.measure``) hands back one mse per (computed layer, probe) through
``observe``. The controller never sees a tensor, so its decisions can be replayed from a
trace and checked against any port of it. What to run is the policy's rule
(``Policy.decide``); the controller owns the state it is decided from: step order, the
latest mse, the thresholds and the trace.

Because layers form a chain, a decision is a *suffix* of layers to run: if layer k's
output is taken from the cache, nothing computed before it this step would be used.

A run may be split into *stages* (``reset(stages=...)``): a model that hands the denoising
from one transformer to another mid-run (Wan 2.2's high-noise and low-noise experts) runs one
stage per expert. Nothing crosses a stage boundary: each stage starts the policy afresh (its
steps counted from the stage's start, no mse, no thresholds), and its first step must compute
every layer without measuring, so one expert's outputs are never compared with, or reused for,
the other's.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

from .policies import ControllerState, Policy, make_config
from .trace import TRACE_SCHEMA, valid_stages


@dataclass(frozen=True)
class StepPlan:
    """What the runtime does at one step. Layers ``start..num_layers-1`` run and each commits
    its probe outputs as the new caches; the input of layer ``start`` (or of the head, when
    ``start == num_layers``) is the cached output of ``source = (layer, probe)``, or the stem's
    output when ``source`` is None."""

    step: int
    start: int
    source: tuple[int, int] | None
    measure: bool  # mse of every probe of every computed layer vs its own cache -> observe()
    num_layers: int

    @property
    def computed(self) -> range:
        return range(self.start, self.num_layers)

    @property
    def skipped(self) -> range:
        return range(0, self.start)


class Controller:
    """Decides, step by step, which layers run. State belongs to one generation: call
    ``reset()`` before each new video so the second behaves exactly like the first (the
    reference never resets, so only its first video gets a warmup and thresholds)."""

    def __init__(self, config: Policy, num_layers: int, num_probes: int):
        if not isinstance(config, Policy):
            raise TypeError(f"config must be a Policy such as ForesightConfig (got {type(config).__name__}); "
                            "build one with make_config()")
        for name, n in (("num_layers", num_layers), ("num_probes", num_probes)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1 (got {n!r}); take it from the model's layer registry")
        self.config, self.num_layers, self.num_probes = config, num_layers, num_probes
        self.reset()

    def reset(self, stages=(0,)) -> None:
        """Start a new generation: step counter, mse, thresholds and trace all cleared.
        ``stages``: the steps at which the run's stages begin, ascending from 0 (one per expert;
        see the module docstring)."""
        stages = tuple(stages)
        if not valid_stages(stages):
            raise ValueError(f"stages must be ascending whole steps starting at 0 (got {list(stages)})")
        self.stages = stages
        self._stage_start = 0
        self._last: StepPlan | None = None
        self._awaiting_observe = False
        self._mse: list[tuple[float, ...] | None] = [None] * self.num_layers  # latest measured, per layer
        self._thr: tuple[tuple[float, ...], ...] | None = None  # set by the policy's calibration step
        self._steps: list[dict] = []  # trace records; their count is the next expected step

    def plan(self, step: int) -> StepPlan:
        expected = len(self._steps)
        if isinstance(step, bool) or step != expected:
            raise RuntimeError(f"plan({step!r}) out of order: expected step {expected}; "
                               "call reset() before a new generation")
        if self._awaiting_observe:
            raise RuntimeError(f"step {self._last.step} asked for measurement but observe() was not called; "
                               f"pass its mse before planning step {step}")
        L, P = self.num_layers, self.num_probes
        if step in self.stages and step:  # a new stage: nothing measured or calibrated before it applies
            self._stage_start = step
            self._mse, self._thr = [None] * L, None
        local = step - self._stage_start
        start, measure = self.config.decide(local, ControllerState(L, P, tuple(self._mse), self._thr,
                                                                   self._stage_start))
        if not (type(start) is int and 0 <= start <= L and type(measure) is bool and not (measure and start == L)):
            raise ValueError(f"policy {self.config.name!r} decided start={start!r}, measure={measure!r} at step {step}: "
                             f"decide() must return (0..{L}, bool), measuring only when a layer runs")
        if local == 0 and (start, measure) != (0, False):
            raise ValueError(f"policy {self.config.name!r} decided start={start}, measure={measure} at step {step}, "
                             f"the first of its stage: it must compute every layer and measure nothing, since no "
                             f"output of this stage is cached yet")
        # Layer `start` takes layer start-1's output, which is that layer's last probe.
        plan = StepPlan(step, start, (start - 1, P - 1) if start else None, measure, L)
        self._steps.append({
            "step": step,
            "computed": list(plan.computed),
            "source": list(plan.source) if plan.source else None,
            "measure": plan.measure,
            "mse": [[None] * P for _ in range(L)],  # filled by observe()
            "thresholds": None if self._thr is None else [list(row) for row in self._thr],
        })
        self._last, self._awaiting_observe = plan, plan.measure
        return plan

    def observe(self, mse) -> None:
        """Take the mse of every probe of every layer the last plan computed, in order
        ``start..num_layers-1``. Checked whole before any state changes, so a rejected call
        can be retried. At the policy's calibration step it also sets thresholds = γ * mse."""
        plan = self._last
        if not self._awaiting_observe:
            raise RuntimeError("observe() follows a plan with measure=True, once; this one has nothing to observe")
        rows = [list(row) for row in mse]
        if len(rows) != len(plan.computed):
            raise ValueError(f"step {plan.step}: got mse for {len(rows)} layers, expected {len(plan.computed)} "
                             f"(layers {plan.start}..{plan.num_layers - 1})")
        for layer, row in zip(plan.computed, rows):
            if len(row) != self.num_probes:
                raise ValueError(f"step {plan.step}, layer {layer}: got {len(row)} probe mse values, "
                                 f"expected {self.num_probes}")
            for probe, v in enumerate(row):
                # An Inf would calibrate an infinite threshold: that layer would be reused forever.
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"step {plan.step}, layer {layer}, probe {probe}: mse must be a finite number "
                                     f">= 0 (got {v!r}); the layer's output or its cache is corrupt")
        record = self._steps[-1]["mse"]
        for layer, row in zip(plan.computed, rows):
            self._mse[layer] = tuple(float(v) for v in row)
            record[layer] = list(self._mse[layer])
        gamma = self.config.calibration(plan.step - self._stage_start)
        if gamma is not None:
            if plan.start != 0:
                raise ValueError(f"policy {self.config.name!r} calibrates at step {plan.step}, which skipped layers: "
                                 f"thresholds need every layer's mse")
            self._thr = tuple(tuple(gamma * m for m in row) for row in self._mse)
        self._awaiting_observe = False

    @property
    def trace(self) -> dict:
        """Every decision of this generation and the numbers behind it, JSON-serialisable
        in the format documented in ``foresight.trace``; a copy, so callers may edit it."""
        trace = {
            "schema": TRACE_SCHEMA,
            "policy": self.config.name,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "num_probes": self.num_probes,
        }
        if len(self.stages) > 1:
            trace["stages"] = list(self.stages)
        trace["steps"] = copy.deepcopy(self._steps)
        return trace

    def summary(self) -> dict:
        """Layer calls run and avoided: the counters tests use to prove reuse happened."""
        calls = sum(len(s["computed"]) for s in self._steps)
        steps = len(self._steps)
        return {"layer_calls": calls, "layer_calls_skipped": steps * self.num_layers - calls, "steps": steps}


def make_controller(policy: str | Policy, num_layers: int, num_probes: int, **overrides) -> Controller:
    """A controller from a policy name or config, with CLI-style overrides (None = keep)."""
    if isinstance(policy, Policy):
        overrides = {**policy.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        policy = overrides.pop("policy")
    return Controller(make_config(policy, **overrides), num_layers, num_probes)
