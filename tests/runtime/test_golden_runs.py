"""The runtime reproduces the golden traces recorded from real runs (tests/golden/<model>-<policy>.json):
same decisions step by step, same measured change. The traces are the conformance input of
every port of the runtime (C++ later); ``python -m tests.golden.record`` writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from foresight import load_trace
from tests.golden.record import POLICIES, PROMPT, SETTINGS

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def golden(model: str, policy: str) -> dict:
    return load_trace((GOLDEN / f"{model}-{policy}.json").read_text())


def assert_same_run(trace: dict, want: dict) -> None:
    assert (trace["num_layers"], trace["num_probes"], trace["config"]) == \
        (want["num_layers"], want["num_probes"], want["config"])
    assert len(trace["steps"]) == len(want["steps"])
    for got, exp in zip(trace["steps"], want["steps"]):
        assert (got["computed"], got["source"], got["measure"]) == (exp["computed"], exp["source"], exp["measure"]), \
            f"step {exp['step']}"
        for row_g, row_e in zip(got["mse"], exp["mse"]):
            assert row_g == pytest.approx(row_e, rel=1e-4, abs=1e-12)


def check_model(runtime, model: str) -> None:
    kinds = set()
    for policy, options in POLICIES.items():
        want = golden(model, policy)
        result = runtime.generate(PROMPT, policy=policy, **options, **SETTINGS)
        assert_same_run(result.trace, want)
        kinds |= {len(s["computed"]) for s in want["steps"]}
    L = runtime.num_layers
    assert L in kinds and min(kinds) < L, "the golden runs cover full and reused steps"


@pytest.mark.parametrize("policy", list(POLICIES))
def test_golden_files_exist_for_every_model_and_policy(policy):
    for model in ("latte", "cogvideox", "cogvideox-tiny-5b", "opensora", "wan"):
        assert golden(model, policy)["policy"] == policy


def test_latte_runtime_reproduces_its_golden_traces(runtime_torch):
    check_model(runtime_torch, "latte")
