"""Oracle: the runtime with policy none reproduces diffusers' LattePipeline for the same seed.

Tolerances: the torch backend runs the same modules as diffusers, op for op, so its
latents must be bit-identical. ONNX Runtime's kernels differ in summation order, so its
latents must agree to 1e-4 of their largest magnitude after 20 DDIM steps (measured: ~1e-6),
and its uint8 frames to within 1 grey level on at least 99.9% of pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPT = "a red square moving left on a black background"
STEPS = 20


@pytest.fixture(scope="module")
def diffusers_output(preset_dir, engines_dir):
    from diffusers import LattePipeline

    from runtime.manifest import load_manifest

    manifest = load_manifest(engines_dir)
    shapes = manifest.shapes  # the runtime's defaults
    pipe = LattePipeline.from_pretrained(preset_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, height=shapes["height"]["default"], width=shapes["width"]["default"],
                  video_length=shapes["frames"]["default"],
                  guidance_scale=manifest.pipeline["default_guidance"], negative_prompt="",
                  clean_caption=False)
    latents = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **kwargs).frames
    frames = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs).frames[0]
    return latents, (frames * 255).round().astype(np.uint8)


def test_torch_backend_is_bit_identical_to_diffusers(runtime_torch, diffusers_output):
    latents, frames = diffusers_output
    result = runtime_torch.generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none")
    assert result.latents.shape == latents.shape
    assert torch.equal(result.latents, latents)
    assert np.array_equal(result.frames, frames)
    assert result.stats["layer_calls_skipped"] == 0


def test_onnxruntime_backend_matches_diffusers(runtime_ort, diffusers_output):
    latents, frames = diffusers_output
    result = runtime_ort.generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none")
    rel = float((result.latents - latents).abs().max() / latents.abs().max())
    print(f"onnxruntime vs diffusers: max relative latent error {rel:.2e}")
    assert rel < 1e-4
    diff = np.abs(result.frames.astype(int) - frames.astype(int))
    assert diff.max() <= 1
    assert (diff == 0).mean() >= 0.999


def test_different_seed_gives_different_video(runtime_torch, diffusers_output):
    latents, _ = diffusers_output
    other = runtime_torch.generate(PROMPT, num_inference_steps=STEPS, seed=1, policy="none", decode=False)
    assert not torch.allclose(other.latents, latents)
