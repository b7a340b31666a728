"""The layer-reuse controller: a pure state machine, floats in, a plan out.

Per step, the runtime asks ``plan(step)`` before running any engine, follows the plan,
and (only when ``plan.measure``) hands back one mse per (computed layer, probe) through
``observe``. The controller never sees a tensor, so its decisions can be replayed from a
trace and checked against any port of it.

Because layers form a chain, a decision is a *suffix* of layers to run: if layer k's
output is taken from the cache, nothing computed before it this step would be used.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
from dataclasses import dataclass

from .config import Config, NoneConfig, StaticConfig, make_config

TRACE_SCHEMA = "foresight-trace/1"


@dataclass(frozen=True)
class StepPlan:
    """What the runtime does at one step. Layers ``start..num_layers-1`` run; the input of
    layer ``start`` (or of the head, when ``start == num_layers``) is the cached output of
    ``source = (layer, probe)``, or the stem's output when ``source`` is None."""

    step: int
    start: int
    source: tuple[int, int] | None
    measure: bool  # mse of every probe of every computed layer vs its own cache -> observe()
    store: bool  # computed layers' probe outputs become the new caches
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

    def __init__(self, config: Config, num_layers: int, num_probes: int):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a NoneConfig, StaticConfig or ForesightConfig "
                            f"(got {type(config).__name__}); build one with make_config()")
        for name, n in (("num_layers", num_layers), ("num_probes", num_probes)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1 (got {n!r}); take it from the model's layer registry")
        self.config, self.num_layers, self.num_probes = config, num_layers, num_probes
        self.reset()

    def reset(self) -> None:
        """Start a new generation: step counter, mse, thresholds and trace all cleared."""
        self._last: StepPlan | None = None
        self._awaiting_observe = False
        self._mse: list[list[float] | None] = [None] * self.num_layers  # latest measured, per layer
        self._thr: list[list[float]] | None = None  # None until calibrated at step warmup-1
        self._steps: list[dict] = []  # trace records; their count is the next expected step

    def plan(self, step: int) -> StepPlan:
        expected = len(self._steps)
        if isinstance(step, bool) or step != expected:
            raise RuntimeError(f"plan({step!r}) out of order: expected step {expected}; "
                               "call reset() before a new generation")
        if self._awaiting_observe:
            raise RuntimeError(f"step {self._last.step} asked for measurement but observe() was not called; "
                               f"pass its mse before planning step {step}")
        plan = StepPlan(step, *self._decide(step), self.num_layers)
        L, P = self.num_layers, self.num_probes
        self._steps.append({
            "step": step,
            "computed": list(plan.computed),
            "source": list(plan.source) if plan.source else None,
            "measure": plan.measure,
            "store": plan.store,
            "mse": [[None] * P for _ in range(L)],  # filled by observe()
            "thresholds": copy.deepcopy(self._thr),
        })
        self._last, self._awaiting_observe = plan, plan.measure
        return plan

    def _decide(self, t: int) -> tuple[int, tuple[int, int] | None, bool, bool]:
        """(start, source, measure, store) for step t, from the policy and the mse so far."""
        cfg, L, P = self.config, self.num_layers, self.num_probes
        reuse_all = (L, (L - 1, P - 1), False, False)
        if isinstance(cfg, NoneConfig):
            return 0, None, False, False
        if isinstance(cfg, StaticConfig):
            if t >= cfg.warmup and (t - cfg.warmup) % cfg.period >= cfg.period - cfg.reuse:
                return reuse_all
            return 0, None, False, t >= cfg.warmup - 1  # the cache must exist before the first reuse
        W = cfg.warmup
        if t < W - 1:
            return 0, None, False, t == W - 2  # W-2 fills the caches that W-1 measures against
        if t == W - 1 or t % cfg.recalculate == 0:
            return 0, None, True, True
        # A layer is reusable if ANY of its probes changed no more than its threshold.
        reusable = [any(m <= th for m, th in zip(mse, thr)) for mse, thr in zip(self._mse, self._thr)]
        k = max((layer for layer, ok in enumerate(reusable) if ok), default=-1)
        if k == L - 1:
            return reuse_all
        return k + 1, ((k, P - 1) if k >= 0 else None), True, True

    def observe(self, mse) -> None:
        """Take the mse of every probe of every layer the last plan computed, in order
        ``start..num_layers-1``. Checked whole before any state changes, so a rejected call
        can be retried. At step warmup-1 it also sets thresholds = threshold * mse."""
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
            self._mse[layer] = [float(v) for v in row]
            record[layer] = list(self._mse[layer])
        if plan.step == self.config.warmup - 1:  # only Foresight measures, so this is its calibration step
            self._thr = [[self.config.threshold * m for m in row] for row in self._mse]
        self._awaiting_observe = False

    @property
    def trace(self) -> dict:
        """Every decision of this generation and the numbers behind it, JSON-serialisable."""
        return {
            "schema": TRACE_SCHEMA,
            "policy": self.config.name,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "num_probes": self.num_probes,
            "steps": copy.deepcopy(self._steps),
        }

    def summary(self) -> dict:
        """Layer calls run and avoided: the counters tests use to prove reuse happened."""
        calls = sum(len(s["computed"]) for s in self._steps)
        steps = len(self._steps)
        return {"layer_calls": calls, "layer_calls_skipped": steps * self.num_layers - calls, "steps": steps}


def make_controller(policy: str | Config, num_layers: int, num_probes: int, **overrides) -> Controller:
    """A controller from a policy name or config, with CLI-style overrides (None = keep)."""
    if isinstance(policy, Config):
        overrides = {**policy.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        policy = overrides.pop("policy")
    return Controller(make_config(policy, **overrides), num_layers, num_probes)


def trace_to_json(trace: dict) -> str:
    """One step per line, so golden traces stay readable and diff step by step."""
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v, allow_nan=False)}" for k, v in trace.items() if k != "steps")
    steps = ",\n  ".join(json.dumps(s, allow_nan=False) for s in trace["steps"])
    return "{" + head + ',\n "steps": [\n  ' + steps + "\n]}\n"


def load_trace(text: str) -> dict:
    """Parse a saved trace, refusing one written by another schema version."""
    trace = json.loads(text)
    schema = trace.get("schema") if isinstance(trace, dict) else None
    if schema != TRACE_SCHEMA:
        raise ValueError(f"not a {TRACE_SCHEMA} trace (schema {schema!r}); "
                         "regenerate it with this version of foresight")
    return trace
