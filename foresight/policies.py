"""Reuse policies: each is one class holding its validated options and its decision rule.

A policy is a frozen dataclass: its fields are its options (named like the CLI flags,
``--warmup`` ...), validated at construction so a bad value fails here, with a message that
names the fix, rather than as a strange plan fifty steps into a generation. Its ``decide``
turns what the controller knows into the layers one step runs. Adding a policy is writing
one subclass with a ``name``: it registers itself, and ``make_config``, ``policy_options``
and the traces find it by that name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .errors import ConfigError
from .trace import valid_stages


@dataclass(frozen=True)
class ControllerState:
    """What the controller knows when it plans a step; read-only, so a policy cannot change it."""

    num_layers: int
    num_probes: int
    mse: tuple[tuple[float, ...] | None, ...]  # latest measured, per layer then probe; None = never measured
    thresholds: tuple[tuple[float, ...], ...] | None  # per layer then probe; None until calibrated
    stage_start: int = 0  # the run's step at which the current stage began (decide gets steps counted from it)


_REGISTRY: dict[str, type[Policy]] = {}  # name -> class, filled by Policy.__init_subclass__


class Policy(ABC):
    """Base of every policy. Subclass it as a ``@dataclass(frozen=True)`` with a ``name`` and a
    ``decide``; fields are the options, ``__post_init__`` validates them."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if not isinstance(name, str):
            raise TypeError(f"{cls.__name__} must set name: ClassVar[str], the name the CLI and traces use")
        if name in _REGISTRY:
            raise TypeError(f"policy name {name!r} is taken by {_REGISTRY[name].__name__}; pick another")
        _REGISTRY[name] = cls

    def check_run(self, num_layers: int, steps: int, stages: tuple[int, ...] | None = None) -> None:
        """Refuse, with a ConfigError naming the fix, a run this policy cannot follow (default: none).
        ``stages``: the steps at which the run's stages begin (see ``Controller.reset``); None when
        not known yet (a CLI checking before it loads the scheduler)."""

    @abstractmethod
    def decide(self, step: int, state: ControllerState) -> tuple[int, bool]:
        """``(start, measure)`` for ``step``, counted from the start of its stage (the whole run
        when it has one stage): layers ``start..num_layers-1`` run (``start == num_layers`` reuses
        the whole stack), and ``measure`` asks for their mse. The controller derives which cache
        feeds layer ``start``: a chain leaves no other choice."""

    def calibration(self, step: int) -> float | None:
        """γ when this step's measurement (``step`` counted from its stage's start) sets the
        thresholds to γ·mse, else None. Asked after every measurement; a step that calibrates must
        have computed every layer."""
        return None

    def to_dict(self) -> dict:
        return {"policy": self.name, **asdict(self)}


def _check_int(name: str, value: object, minimum: int, why: str) -> None:
    # bool is an int subclass, but --warmup True is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number (got {value!r}); pass e.g. --{name} {minimum}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum} (got {value}): {why}; pass --{name} {minimum} or more")


@dataclass(frozen=True)
class NoneConfig(Policy):
    """Full compute every step: the true baseline (the reference's "baseline" silently reused layers)."""

    name: ClassVar[str] = "none"

    def decide(self, step: int, state: ControllerState) -> tuple[int, bool]:
        return 0, False


@dataclass(frozen=True)
class StaticConfig(Policy):
    """The paper's uniform-reuse baseline: after warmup, reuse the whole stack output
    `reuse` steps out of every `period`."""

    warmup: int = 4
    reuse: int = 1
    period: int = 2
    name: ClassVar[str] = "static"

    def __post_init__(self) -> None:
        _check_int("warmup", self.warmup, 1, "static reuse needs one computed step to fill the cache")
        _check_int("reuse", self.reuse, 1, "a static policy that never reuses is --policy none")
        _check_int("period", self.period, 2, "a period must hold one reused and one computed step")
        if self.reuse >= self.period:
            raise ConfigError(
                f"reuse must be < period (got reuse={self.reuse}, period={self.period}): every period needs "
                f"a computed step to refresh the cache; pass --period {self.reuse + 1} or more, or a smaller --reuse"
            )

    def decide(self, step: int, state: ControllerState) -> tuple[int, bool]:
        # Each period opens with its computed steps, so every reuse follows a fresh cache.
        phase = (step - self.warmup) % self.period
        reused = step >= self.warmup and phase >= self.period - self.reuse
        return (state.num_layers if reused else 0), False


@dataclass(frozen=True)
class ForesightConfig(Policy):
    """Adaptive reuse (Foresight). Thresholds come from the single step warmup-1 vs warmup-2,
    as in the reference code; the paper's weighted three-step average is not offered because
    its weights are not documented."""

    warmup: int = 8
    recalculate: int = 2
    threshold: float = 0.5
    name: ClassVar[str] = "foresight"

    def __post_init__(self) -> None:
        _check_int("warmup", self.warmup, 2, "Foresight calibrates at step warmup-1 against step warmup-2")
        _check_int("recalculate", self.recalculate, 1, "steps with step % recalculate == 0 recompute every layer")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ConfigError(
                f"threshold must be a finite number >= 0 (got {t!r}): it scales the calibrated per-layer change; "
                "pass e.g. --threshold 0.5 (smaller is safer, larger is faster)"
            )
        object.__setattr__(self, "threshold", float(t))  # so to_dict and traces always hold a float

    def decide(self, step: int, state: ControllerState) -> tuple[int, bool]:
        if step < self.warmup - 1:
            return 0, False  # step warmup-2 fills the caches that warmup-1 measures against
        if step == self.warmup - 1 or step % self.recalculate == 0:
            return 0, True
        # A layer is reusable if ANY of its probes changed no more than its threshold; the
        # deepest reusable layer decides, since nothing before it feeds this step's output.
        reusable = [any(m <= th for m, th in zip(mse, thr)) for mse, thr in zip(state.mse, state.thresholds)]
        start = 1 + max((layer for layer, ok in enumerate(reusable) if ok), default=-1)
        return start, start < state.num_layers

    def calibration(self, step: int) -> float | None:
        return self.threshold if step == self.warmup - 1 else None


@dataclass(frozen=True)
class ReplayPolicy(Policy):
    """Follows the decisions of a saved trace, step by step (``--policy replay --trace stats.json``):
    the layers each step ran and whether it measured. It runs a model with another model's
    decision pattern (a GPU benchmark of a size no trained model exists for) and gives ports
    of the runtime a conformance input. Refuses a run whose layer or step count differs."""

    decisions: tuple = ()  # ((start, measure), ...): one per step
    num_layers: int = 0
    stages: tuple = (0,)  # the steps the trace's stages began at (a new expert each)
    name: ClassVar[str] = "replay"

    def __post_init__(self) -> None:
        if not self.decisions:
            raise ConfigError("replay needs the decisions of a saved trace: pass --trace stats.json "
                              "(written by foresight-run --stats) or a saved foresight-trace/2 file")
        _check_int("num_layers", self.num_layers, 1, "a trace describes at least one layer")
        clean = []
        for step, decision in enumerate(self.decisions):
            start, measure = decision
            if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= self.num_layers \
                    or not isinstance(measure, bool) or (measure and start == self.num_layers):
                raise ConfigError(f"replay decision {decision!r} at step {step} is not one of a "
                                  f"{self.num_layers}-layer trace; regenerate the trace")
            clean.append((start, measure))
        stages = tuple(self.stages)
        if not valid_stages(stages) or stages[-1] >= len(clean):
            raise ConfigError(f"replay stages {list(stages)} are not ascending steps of the trace starting at 0; "
                              f"regenerate the trace")
        for s in stages:
            if clean[s] != (0, False):
                raise ConfigError(f"replay decision {clean[s]} at step {s}, where a stage begins, reuses or measures: "
                                  f"nothing of a new stage is cached yet; regenerate the trace")
        object.__setattr__(self, "decisions", tuple(clean))  # JSON lists -> tuples, so configs compare
        object.__setattr__(self, "stages", stages)

    @classmethod
    def from_trace(cls, trace: dict) -> "ReplayPolicy":
        """The decisions of a trace (``load_trace``'s result)."""
        L = trace["num_layers"]
        return cls(tuple((L - len(s["computed"]), s["measure"]) for s in trace["steps"]), L,
                   tuple(trace.get("stages", (0,))))

    def check_run(self, num_layers: int, steps: int, stages: tuple[int, ...] | None = None) -> None:
        if num_layers != self.num_layers:
            raise ConfigError(f"the replayed trace is of a {self.num_layers}-layer model and these engines have "
                              f"{num_layers} layers: record the trace on a model with as many layers")
        if steps != len(self.decisions):
            raise ConfigError(f"the replayed trace has {len(self.decisions)} steps: pass --steps {len(self.decisions)}")
        if stages is not None and tuple(stages) != self.stages:
            raise ConfigError(f"the replayed trace's stages (experts) begin at steps {list(self.stages)}, this run's at "
                              f"{list(stages)}: record the trace with the same model, steps and scheduler")

    def decide(self, step: int, state: ControllerState) -> tuple[int, bool]:
        step += state.stage_start  # the trace numbers the run's steps
        if state.num_layers != self.num_layers or step >= len(self.decisions):
            self.check_run(state.num_layers, step + 1, self.stages)
        return self.decisions[step]


POLICIES: tuple[str, ...] = tuple(_REGISTRY)  # the shipped policies, in CLI order


def _policy_class(name: str) -> type[Policy]:
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown policy {name!r}: pass one of {', '.join(_REGISTRY)}")
    return cls


def policy_options(name: str) -> tuple[str, ...]:
    """The options policy ``name`` takes, in declaration order: its dataclass fields."""
    return tuple(f.name for f in fields(_policy_class(name)))


def make_config(policy: str, **overrides) -> Policy:
    """Build a policy from CLI-style options; options left as None keep their defaults,
    so a CLI can pass every flag through unchanged."""
    allowed = policy_options(policy)
    given = {k: v for k, v in overrides.items() if v is not None}
    extra = [k for k in given if k not in allowed]
    if extra:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
        raise ConfigError(f"{', '.join(extra)} does not apply to policy {policy!r} ({takes}); "
                          "drop it or pick another policy")
    return _REGISTRY[policy](**given)
