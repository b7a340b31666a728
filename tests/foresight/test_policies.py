import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

from foresight import (
    POLICIES,
    ConfigError,
    ControllerState,
    ForesightConfig,
    NoneConfig,
    Policy,
    StaticConfig,
    make_config,
    make_controller,
    policy_options,
)


def test_defaults_and_to_dict():
    assert POLICIES == ("none", "static", "foresight", "replay")
    assert NoneConfig().to_dict() == {"policy": "none"}
    assert StaticConfig().to_dict() == {"policy": "static", "warmup": 4, "reuse": 1, "period": 2}
    assert ForesightConfig().to_dict() == {"policy": "foresight", "warmup": 8, "recalculate": 2, "threshold": 0.5}


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ForesightConfig().warmup = 3


def test_threshold_int_is_stored_as_float():
    cfg = ForesightConfig(threshold=1)
    assert cfg.threshold == 1.0 and isinstance(cfg.threshold, float)


@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (ForesightConfig, {"warmup": 1}, "warmup must be >= 2 (got 1): Foresight calibrates at step warmup-1 against step warmup-2; pass --warmup 2 or more"),
        (ForesightConfig, {"warmup": 0}, "warmup must be >= 2 (got 0)"),
        (ForesightConfig, {"recalculate": 0}, "recalculate must be >= 1 (got 0)"),
        (ForesightConfig, {"threshold": -0.1}, "threshold must be a finite number >= 0 (got -0.1)"),
        (ForesightConfig, {"threshold": float("nan")}, "threshold must be a finite number >= 0 (got nan)"),
        (ForesightConfig, {"threshold": float("inf")}, "threshold must be a finite number >= 0 (got inf)"),
        (ForesightConfig, {"threshold": "0.5"}, "threshold must be a finite number >= 0 (got '0.5')"),
        (ForesightConfig, {"threshold": True}, "threshold must be a finite number >= 0 (got True)"),
        (ForesightConfig, {"warmup": 8.0}, "warmup must be a whole number (got 8.0)"),
        (ForesightConfig, {"recalculate": True}, "recalculate must be a whole number (got True)"),
        (StaticConfig, {"warmup": 0}, "warmup must be >= 1 (got 0): static reuse needs one computed step to fill the cache; pass --warmup 1 or more"),
        (StaticConfig, {"reuse": 0}, "reuse must be >= 1 (got 0)"),
        (StaticConfig, {"reuse": 1, "period": 1}, "period must be >= 2 (got 1)"),
        (StaticConfig, {"reuse": 2, "period": 2}, "reuse must be < period (got reuse=2, period=2)"),
        (StaticConfig, {"reuse": 3, "period": 2}, "pass --period 4 or more"),
        (StaticConfig, {"period": "2"}, "period must be a whole number (got '2')"),
        (StaticConfig, {"warmup": False}, "warmup must be a whole number (got False)"),
    ],
)
def test_bad_values_name_the_fix(cls, kwargs, needle):
    with pytest.raises(ConfigError) as err:
        cls(**kwargs)
    assert needle in str(err.value)
    assert "pass" in str(err.value)  # every message says what to do


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_valid_edges_accepted():
    ForesightConfig(warmup=2, recalculate=1, threshold=0.0)
    StaticConfig(warmup=1, reuse=2, period=3)


def test_make_config_builds_each_policy():
    assert make_config("none") == NoneConfig()
    assert make_config("static", reuse=2, period=3) == StaticConfig(reuse=2, period=3)
    assert make_config("foresight", warmup=5, threshold=1.0) == ForesightConfig(warmup=5, threshold=1.0)


def test_make_config_ignores_none_overrides():
    # A CLI passes every flag through; unset flags arrive as None and keep the defaults.
    assert make_config("foresight", warmup=None, recalculate=None, threshold=None) == ForesightConfig()
    assert make_config("none", threshold=None, warmup=None) == NoneConfig()


def test_make_config_unknown_policy_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown policy 'pab': pass one of none, static, foresight"):
        make_config("pab")
    with pytest.raises(ConfigError, match="unknown policy"):
        make_config(None)


def test_make_config_rejects_options_of_other_policies():
    with pytest.raises(ConfigError, match=r"threshold does not apply to policy 'none' \(it takes no options\)"):
        make_config("none", threshold=0.5)
    with pytest.raises(ConfigError, match=r"threshold, recalculate does not apply to policy 'static' \(it takes warmup, reuse, period\)"):
        make_config("static", threshold=0.5, recalculate=2)
    with pytest.raises(ConfigError, match="period does not apply to policy 'foresight'"):
        make_config("foresight", period=2)


def test_make_config_validates_values():
    with pytest.raises(ConfigError, match="warmup must be >= 2"):
        make_config("foresight", warmup=1)


# --- policies are classes: options, rule, registry ----------------------------------------


def test_policy_options_are_the_dataclass_fields():
    assert policy_options("none") == ()
    assert policy_options("static") == ("warmup", "reuse", "period")
    assert policy_options("foresight") == ("warmup", "recalculate", "threshold")
    with pytest.raises(ConfigError, match="unknown policy 'pab': pass one of none, static, foresight"):
        policy_options("pab")


def test_shipped_policies_are_policy_classes():
    for name in POLICIES:
        config = make_config(name, **({"decisions": ((0, False),), "num_layers": 1} if name == "replay" else {}))
        assert isinstance(config, Policy) and config.name == name
    with pytest.raises(TypeError):
        Policy()  # abstract: a policy without a decision rule is not one


def test_a_rule_can_be_called_without_a_controller():
    state = ControllerState(num_layers=3, num_probes=1, mse=((0.5,), (2.0,), (9.0,)), thresholds=((1.0,),) * 3)
    assert ForesightConfig(warmup=2, recalculate=2).decide(3, state) == (1, True)  # layer 0 reusable
    assert ForesightConfig(warmup=2, recalculate=2).decide(4, state) == (0, True)  # forced recompute
    assert StaticConfig(warmup=1, reuse=1, period=2).decide(2, state) == (3, False)
    assert NoneConfig().decide(7, state) == (0, False)


def test_a_new_policy_is_one_class(fresh_registry):
    @dataclass(frozen=True)
    class SkipPrefix(Policy):
        """Skip the first `skip` layers on odd steps."""

        skip: int = 1
        name: ClassVar[str] = "skip-prefix"

        def __post_init__(self):
            if self.skip < 1:
                raise ConfigError(f"skip must be >= 1 (got {self.skip}); pass --skip 1 or more")

        def decide(self, step, state):
            return (self.skip if step % 2 else 0), False

    assert policy_options("skip-prefix") == ("skip",)
    assert make_config("skip-prefix", skip=2) == SkipPrefix(skip=2)
    assert make_config("skip-prefix", skip=None).to_dict() == {"policy": "skip-prefix", "skip": 1}
    with pytest.raises(ConfigError, match=r"threshold does not apply to policy 'skip-prefix' \(it takes skip\)"):
        make_config("skip-prefix", threshold=0.5)
    with pytest.raises(ConfigError, match="skip must be >= 1"):
        make_config("skip-prefix", skip=0)
    with pytest.raises(ConfigError, match="pass one of none, static, foresight, replay, skip-prefix"):
        make_config("pab")
    ctrl = make_controller("skip-prefix", 3, 1, skip=2)
    assert [list(ctrl.plan(t).computed) for t in range(3)] == [[0, 1, 2], [2], [0, 1, 2]]


def test_a_policy_needs_its_own_name(fresh_registry):
    with pytest.raises(TypeError, match="must set name"):
        class Nameless(Policy):
            def decide(self, step, state):
                return 0, False
    with pytest.raises(TypeError, match="policy name 'foresight' is taken by ForesightConfig; pick another"):
        class Impostor(Policy):
            name: ClassVar[str] = "foresight"

            def decide(self, step, state):
                return 0, False
