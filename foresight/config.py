"""Reuse-policy configs: frozen dataclasses that validate themselves at construction.

A bad value fails here, with a message that names the fix, rather than as a strange
plan fifty steps into a generation. Option names match the CLI flags (``--warmup`` ...).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar


class ConfigError(ValueError):
    """A policy name, option or value that cannot work; the message says what to pass instead."""


def _check_int(name: str, value: object, minimum: int, why: str) -> None:
    # bool is an int subclass, but --warmup True is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a whole number (got {value!r}); pass e.g. --{name} {minimum}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum} (got {value}): {why}; pass --{name} {minimum} or more")


class _Policy:
    """What every policy config shares: the name the CLI and traces use, and a plain dict."""

    name: ClassVar[str]

    def to_dict(self) -> dict:
        return {"policy": self.name, **asdict(self)}


@dataclass(frozen=True)
class NoneConfig(_Policy):
    """Full compute every step: the true baseline (the reference's "baseline" silently reused layers)."""

    name: ClassVar[str] = "none"


@dataclass(frozen=True)
class StaticConfig(_Policy):
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


@dataclass(frozen=True)
class ForesightConfig(_Policy):
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


Config = NoneConfig | StaticConfig | ForesightConfig
_CONFIGS: dict[str, type] = {c.name: c for c in (NoneConfig, StaticConfig, ForesightConfig)}
POLICIES: tuple[str, ...] = tuple(_CONFIGS)


def make_config(policy: str, **overrides) -> Config:
    """Build a policy's config from CLI-style options; options left as None keep their defaults,
    so a CLI can pass every flag through unchanged."""
    cls = _CONFIGS.get(policy) if isinstance(policy, str) else None
    if cls is None:
        raise ConfigError(f"unknown policy {policy!r}: pass one of {', '.join(POLICIES)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    allowed = [f.name for f in fields(cls)]
    extra = [k for k in given if k not in allowed]
    if extra:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
        raise ConfigError(f"{', '.join(extra)} does not apply to policy {policy!r} ({takes}); "
                          "drop it or pick another policy")
    return cls(**given)
