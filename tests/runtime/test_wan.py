"""Wan 2.1 end to end on the random-weight tiny preset: with policy none the torch backend is bit-identical
to diffusers' WanPipeline (two CFG passes per step, as WanPipeline runs them) at two sizes and frame
counts, ONNX Runtime within 1e-4; the passes share one plan per step; frame counts the VAE cannot make
are refused; the released configurations split on the meta device."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from exporter.families import get_family

PROMPT = "a red square moving left on a black background"
STEPS = 6
PRESET = get_family("wan").presets["tiny-random"]


@pytest.fixture(scope="module")
def wan_engines(wan_engines_dir):
    return wan_engines_dir


@pytest.fixture(scope="module")
def runtimes(wan_engines):
    from runtime import Runtime

    return {b: Runtime.load(wan_engines, backend=b, device="cpu") for b in ("torch", "onnxruntime")}


def reference(frames, height, width, guidance=5.0, seed=0):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(PRESET)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=frames, height=height, width=width, num_inference_steps=STEPS, guidance_scale=guidance,
                  max_sequence_length=16)
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).frames
    video = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).frames[0]
    return latents, (video * 255).round().astype(np.uint8)


@pytest.mark.parametrize("size", [(9, 64, 64), (5, 48, 80)], ids=["default size", "other size"])
def test_torch_backend_is_bit_identical_to_wan_pipeline(runtimes, size):
    latents, video = reference(*size)
    frames, height, width = size
    result = runtimes["torch"].generate(PROMPT, num_frames=frames, height=height, width=width,
                                        num_inference_steps=STEPS, seed=0, policy="none")
    assert result.latents.shape == latents.shape == (1, 4, (frames - 1) // 4 + 1, height // 8, width // 8)
    assert torch.equal(result.latents, latents)
    assert np.array_equal(result.frames, video)


def test_onnxruntime_backend_matches_wan_pipeline(runtimes):
    latents, video = reference(9, 64, 64)
    result = runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none")
    assert float((result.latents - latents).abs().max() / latents.abs().max()) < 1e-4
    assert np.abs(result.frames.astype(int) - video.astype(int)).max() <= 1


def test_without_guidance_one_pass_per_step(runtimes):
    latents, _ = reference(9, 64, 64, guidance=1.0)
    result = runtimes["torch"].generate(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, seed=0, policy="none",
                                        decode=False)
    assert torch.equal(result.latents, latents)
    assert result.stats["layer_engine_calls"] == STEPS * runtimes["torch"].num_layers


def test_two_passes_per_step_follow_one_plan(runtimes):
    """Both CFG passes run the planned layers on batch-1 halves of the same buffers, the conditional
    half first; the cache and the mse cover both halves."""
    rt = runtimes["onnxruntime"]
    calls = []
    real = rt.backend.run

    def spy(part, inputs, outputs):
        first = next(iter(inputs.values()))
        calls.append((part, first.shape[0], first.data_ptr()))
        real(part, inputs, outputs)

    rt.backend.run = spy
    try:
        result = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy="foresight", warmup=3, recalculate=2,
                             threshold=5.0, decode=False)
    finally:
        del rt.backend.run
    assert all(batch == 1 for _, batch, _ in calls)
    steps = result.trace["steps"]
    assert result.stats["layer_calls_skipped"] > 0
    assert result.stats["layer_engine_calls"] == 2 * sum(len(s["computed"]) for s in steps)
    assert sum(part == "head" for part, _, _ in calls) == 2 * len(steps)
    stems = [ptr for part, _, ptr in calls if part == "stem"]
    assert len(stems) == 2 * len(steps) and stems[0] != stems[1] and stems[0] == stems[2]  # halves alternate
    assert stems[0] > stems[1]  # the conditional half (row 1) runs first, as WanPipeline's order


def test_frame_counts_the_vae_cannot_make_are_refused(runtimes):
    from runtime.errors import ShapeError

    with pytest.raises(ShapeError, match="pass --frames 5 or 9"):
        runtimes["torch"].generate(PROMPT, num_frames=8, num_inference_steps=2, decode=False)


@pytest.mark.parametrize("file, change, words", [
    ("model_index.json", lambda d: d.update(boundary_ratio=1.5), "not a number in"),
    ("model_index.json", lambda d: d.update(boundary_ratio=True), "not a number in"),
    ("transformer/config.json", lambda d: d.update(image_dim=64), "image-conditioned"),
])
def test_unsupported_wan_variants_are_refused_by_name(tmp_path, file, change, words):
    from dit.errors import ModelError

    folder = tmp_path / "ckpt"
    shutil.copytree(PRESET, folder)
    data = json.loads((folder / file).read_text())
    change(data)
    (folder / file).write_text(json.dumps(data))
    with pytest.raises(ModelError, match=words):
        get_family("wan").load(str(folder))


@pytest.mark.parametrize("config", [
    dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),   # Wan2.1-T2V-1.3B
    dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),  # Wan2.1-T2V-14B
], ids=["1.3B", "14B"])
def test_released_configurations_split_on_the_meta_device(config):
    from diffusers import WanTransformer3DModel

    family = get_family("wan")
    with torch.device("meta"):
        model = WanTransformer3DModel(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16,
                                      text_dim=4096, freq_dim=256, cross_attn_norm=True, **config)
        parts = family.parts(model)
        assert len(parts) == config["num_layers"] + 2
        latents = torch.empty(2, 16, 21, 60, 104)  # 81 frames of 480x832: WanPipeline's default
        hidden, text, temb, proj = parts[0].module(latents, torch.empty(2), torch.empty(2, 512, 4096))
        d = 128 * config["num_attention_heads"]
        assert hidden.shape == (2, 21, 30, 52, d) and proj.shape == (2, 6, d) and text.shape == (2, 512, d)
        out = parts[1].module(hidden, text, proj)
        assert out.shape == hidden.shape
        assert parts[-1].module(out, temb).shape == latents.shape


def test_runtime_reproduces_the_wan_golden_traces(runtimes):
    from tests.runtime.test_golden_runs import check_model

    check_model(runtimes["torch"], "wan")


def test_unipc_with_flow_shift_is_bit_identical_too(wan_engines, tmp_path):
    """The scheduler the checkpoint names: UniPC with flow prediction and flow_shift (the released
    Wan2.1 diffusers checkpoints' scheduler) in place of FlowMatchEuler, same engines."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from runtime import Runtime
    from runtime.manifest import file_table

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    folder = tmp_path / "engines"
    shutil.copytree(wan_engines, folder)
    scheduler.save_pretrained(folder / "scheduler")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_table(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))

    pipe = WanPipeline.from_pretrained(PRESET, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, num_frames=9, height=64, width=64, num_inference_steps=STEPS, max_sequence_length=16,
                   generator=torch.Generator().manual_seed(0), output_type="latent").frames
    result = Runtime.load(folder, backend="torch", device="cpu").generate(
        PROMPT, num_inference_steps=STEPS, seed=0, policy="none", decode=False)
    assert torch.equal(result.latents, latents)
