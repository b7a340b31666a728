"""Concurrent callers, many prompt lengths, reduced precision: the runtime stays correct and bounded."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from foresight import Controller, ForesightConfig, NoneConfig
from runtime.engine import probe_mse
from runtime.errors import ConfigError, NumericsError

PROMPT = "a red square moving left on a gray background"


def test_two_threads_on_one_runtime_give_the_sequential_frames(runtime_ort):
    prompts = [PROMPT, "a blue circle moving up on a black background"]
    kwargs = dict(num_inference_steps=6, seed=3, policy="foresight", warmup=2, recalculate=2)
    sequential = [runtime_ort.generate(p, **kwargs).frames for p in prompts]
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = runtime_ort.generate(prompts[i], **kwargs).frames
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        np.testing.assert_array_equal(results[i], sequential[i])


def test_the_pool_cache_is_bounded_whatever_the_prompt_lengths(engines_dir):
    from runtime import Runtime

    rt = Runtime.load(engines_dir, backend="onnxruntime", device="cpu")
    words = "red green blue yellow square circle moving left right up down on a gray black background".split()
    for n in range(1, 11):  # ten prompt lengths -> ten text-token shapes
        rt.generate(" ".join(words[:n]), num_inference_steps=1, policy="none", guidance_scale=1.0, decode=False)
    assert rt.pools_created == 10
    assert len(rt._pools) == rt.POOL_CACHE_SIZE
    assert rt.pools_evicted == 10 - rt.POOL_CACHE_SIZE
    rt.generate(" ".join(words[:10]), num_inference_steps=1, policy="none", guidance_scale=1.0, decode=False)
    assert rt.pools_created == 10  # the most recent shape is still cached


def test_probe_mse_of_half_precision_outputs_does_not_overflow():
    new = torch.full((4, 8), 300.0, dtype=torch.float16)
    old = torch.zeros(4, 8, dtype=torch.float16)
    assert torch.square(new - old).isinf().all()  # what the fp16 arithmetic itself gives
    assert probe_mse(new, old).item() == pytest.approx(90000.0)
    assert probe_mse(new.float(), old.float()).dtype == torch.float32


def test_a_non_finite_change_is_a_numerics_error_naming_layer_and_step(runtime_ort, monkeypatch):
    """Finite outputs whose squared change overflows fp32: the normal NaN/Inf error, not a ValueError."""
    backend = runtime_ort.backend
    original = backend.run
    calls = {"n": 0}

    def run(part, inputs, outputs):
        original(part, inputs, outputs)
        if part == "layer_002":
            calls["n"] += 1
            if calls["n"] == 3:  # the probe only: the state carried on stays sane
                outputs["spatial"].fill_(1e30)

    monkeypatch.setattr(backend, "run", run)
    with pytest.raises(NumericsError, match=r"layer 2 \(layer_002\).*step 2"):
        runtime_ort.generate(PROMPT, num_inference_steps=5, policy="foresight", warmup=2, recalculate=1,
                             decode=False)


def test_generate_takes_a_policy_object_or_a_controller(runtime_ort):
    a = runtime_ort.generate(PROMPT, num_inference_steps=6, policy=ForesightConfig(warmup=2, recalculate=3,
                                                                                     threshold=2.0), decode=False)
    controller = Controller(ForesightConfig(warmup=2, recalculate=3, threshold=2.0), runtime_ort.num_layers,
                            len(runtime_ort.probes))
    b = runtime_ort.generate(PROMPT, num_inference_steps=6, policy=controller, decode=False)
    assert a.trace["steps"] == b.trace["steps"] == controller.trace["steps"]
    wrong = Controller(NoneConfig(), runtime_ort.num_layers + 1, 1)
    with pytest.raises(ConfigError, match="layers"):
        runtime_ort.generate(PROMPT, num_inference_steps=2, policy=wrong, decode=False)
    with pytest.raises(ConfigError, match="recalculate"):
        runtime_ort.generate(PROMPT, num_inference_steps=2, policy=NoneConfig(), recalculate=2, decode=False)


@pytest.mark.parametrize("seed", [1.5, "3", True, -1, 2**64, None])
def test_the_api_refuses_seeds_the_generator_would_misread(runtime_ort, seed):
    with pytest.raises(ConfigError, match="seed"):
        runtime_ort.generate(PROMPT, num_inference_steps=1, seed=seed, decode=False)


def test_the_largest_seed_is_accepted(runtime_ort):
    runtime_ort.generate(PROMPT, num_inference_steps=1, seed=2**64 - 1, policy="none", decode=False)
