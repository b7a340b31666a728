"""Wan 2.2 TI2V-5B's per-token timesteps (``expand_timesteps``) end to end, on the random-weight tiny
preset in the TI2V layout (the Wan 2.2 VAE with its 2x2 pixel patchify, 16x spatial): the stem takes
one timestep per token; with policy none the torch backend is bit-identical to diffusers'
WanPipeline at two sizes (latents and decoded frames), ONNX Runtime within 1e-4; the released 5B
configuration splits on the meta device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.families import get_family

PROMPT = "a red square moving left on a black background"
STEPS = 6
PRESET = get_family("wan").presets["tiny-random-ti2v"]


@pytest.fixture(scope="module")
def ti2v_engines(preset_engines):
    return preset_engines("wan", "tiny-random-ti2v")


@pytest.fixture(scope="module")
def runtimes(ti2v_engines):
    from runtime import Runtime

    return {b: Runtime.load(ti2v_engines, backend=b, device="cpu") for b in ("torch", "onnxruntime")}


def reference(frames, height, width, output_type="latent"):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(PRESET)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.expand_timesteps
    out = pipe(PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=STEPS, guidance_scale=5.0,
               max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type=output_type).frames
    return out if output_type == "latent" else (out[0] * 255).round().astype(np.uint8)


def test_the_timesteps_are_per_token(ti2v_engines):
    from runtime.manifest import load_manifest

    m = load_manifest(ti2v_engines)
    assert m.pipeline["expand_timesteps"] is True and m.pipeline["vae_scale_factor"] == 16
    stem = {t.name: t.shape for t in m.stem.inputs + m.stem.outputs}
    d = m.model_config["num_attention_heads"] * m.model_config["attention_head_dim"]
    assert stem["timestep"] == ("B", "F", "h", "w")
    assert stem["temb"] == ("B", "F", "h", "w", d) and stem["timestep_proj"] == ("B", "F", "h", "w", 6, d)
    assert dict((t.name, t.shape) for t in m.layers[0].inputs)["timestep_proj"] == ("B", "F", "h", "w", 6, d)


@pytest.mark.parametrize("size", [(9, 128, 128), (5, 64, 96)], ids=["default size", "other size"])
def test_torch_backend_is_bit_identical_to_wan_pipeline(runtimes, size):
    frames, height, width = size
    latents = reference(*size)
    result = runtimes["torch"].generate(PROMPT, num_frames=frames, height=height, width=width,
                                        num_inference_steps=STEPS, seed=0, policy="none")
    assert result.latents.shape == (1, 4, (frames - 1) // 4 + 1, height // 16, width // 16)
    assert torch.equal(result.latents, latents)
    if size == (9, 128, 128):
        assert np.array_equal(result.frames, reference(*size, output_type="np"))


def test_onnxruntime_backend_matches_wan_pipeline(runtimes):
    latents = reference(9, 128, 128)
    result = runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none", decode=False)
    assert float((result.latents - latents).abs().max() / latents.abs().max()) < 1e-4


def test_foresight_reuses_with_per_token_timesteps(runtimes):
    result = runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=12, seed=0, policy="foresight", warmup=3,
                                              recalculate=2, threshold=5.0, decode=False)
    assert result.stats["layer_calls_skipped"] > 0 and torch.isfinite(result.latents).all()


def test_released_ti2v_5b_configuration_splits_on_the_meta_device():
    from diffusers import WanTransformer3DModel

    family = get_family("wan")
    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128,
                                      in_channels=48, out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336,
                                      num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
        parts = family.parts(model, {"expand_timesteps": True})
        assert len(parts) == 32
        latents = torch.empty(2, 48, 31, 44, 80)  # 121 frames of 704x1280, the TI2V-5B default
        hidden, text, temb, proj = parts[0].module(latents, torch.empty(2, 31, 22, 40), torch.empty(2, 512, 4096))
        assert hidden.shape == (2, 31, 22, 40, 3072) and temb.shape == (2, 31, 22, 40, 3072)
        assert proj.shape == (2, 31, 22, 40, 6, 3072)
        out = parts[1].module(hidden, text, proj)
        assert out.shape == hidden.shape
        assert parts[-1].module(out, temb).shape == latents.shape
