import dataclasses

import pytest

from foresight import POLICIES, ConfigError, ForesightConfig, NoneConfig, StaticConfig, make_config


def test_defaults_and_to_dict():
    assert POLICIES == ("none", "static", "foresight")
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
