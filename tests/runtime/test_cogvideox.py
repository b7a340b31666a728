"""CogVideoX end to end: the shipped tiny checkpoints (2B-style sin-cos + CogVideoXDDIM, 5B-style
rotary + CogVideoXDPM) export, and the runtime with policy none reproduces diffusers'
CogVideoXPipeline for the same prompt and seed — bit for bit on the torch backend, at the
training size and at another size (where the position tables are recomputed); reuse restores
both carried tensors (video and text tokens) from the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.runtime.test_engine import run_scripted

PROMPT = "a red square moving left on a black background"
STEPS = 6


@pytest.fixture(scope="module", params=["tiny", "tiny-5b"])
def exported(request):
    from exporter.families import get_family

    # The session's AOTInductor exports (the C++ tests use them too) hold the same ONNX files.
    if request.param == "tiny":
        out = request.getfixturevalue("aoti_engines_dir")
    else:
        out = request.getfixturevalue("preset_engines")("cogvideox", request.param, backend="aoti")
    return get_family("cogvideox").presets[request.param], out


@pytest.fixture(scope="module")
def runtimes(exported):
    from runtime import Runtime

    _, engines = exported
    return {b: Runtime.load(engines, backend=b, device="cpu") for b in ("torch", "onnxruntime")}


def default_size(rt) -> tuple[int, int, int]:
    shapes = rt.manifest.shapes
    return shapes["frames"]["default"], shapes["height"]["default"], shapes["width"]["default"]


def reference(preset, frames, height, width, guidance=6.0, seed=0):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(preset)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=STEPS, num_frames=frames, height=height, width=width, guidance_scale=guidance,
                  max_sequence_length=pipe.transformer.config.max_text_seq_length)
    latents = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent", **kwargs).frames
    video = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).frames[0]
    return latents, (video * 255).round().astype(np.uint8)


@pytest.mark.parametrize("other", [False, True], ids=["training size", "other size"])
def test_torch_backend_is_bit_identical_to_the_cogvideox_pipeline(exported, runtimes, other):
    preset, _ = exported
    frames, height, width = default_size(runtimes["torch"])
    if other:  # 8 frames (an even latent count), one grid step shorter and one wider: tables recomputed
        step = max(8, runtimes["torch"].manifest.shapes["height"]["multiple_of"])  # the pipeline wants 8k
        frames, height, width = 8, height - step, width + step
    latents, video = reference(preset, frames, height, width)
    result = runtimes["torch"].generate(PROMPT, num_frames=frames, height=height, width=width,
                                        num_inference_steps=STEPS, seed=0, policy="none")
    f = runtimes["torch"].parts.config["vae_scale_factor"]
    assert result.latents.shape == latents.shape == (1, (frames - 1) // 4 + 1, 4, height // f, width // f)
    assert torch.equal(result.latents, latents)
    assert result.frames.shape == (frames, height, width, 3)
    assert np.array_equal(result.frames, video)


def test_onnxruntime_backend_matches_the_cogvideox_pipeline(exported, runtimes):
    preset, _ = exported
    latents, video = reference(preset, *default_size(runtimes["onnxruntime"]))
    result = runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none")
    rel = float((result.latents - latents).abs().max() / latents.abs().max())
    assert rel < 1e-4
    assert np.abs(result.frames.astype(int) - video.astype(int)).max() <= 1


def test_without_guidance_the_batch_is_one(exported, runtimes):
    preset, _ = exported
    latents, _ = reference(preset, *default_size(runtimes["torch"]), guidance=1.0)
    result = runtimes["torch"].generate(PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, seed=0,
                                        policy="none", decode=False)
    assert torch.equal(result.latents, latents)


def test_reuse_restores_video_and_text_tokens_from_the_cache(runtimes):
    rt = runtimes["onnxruntime"]
    L = rt.num_layers
    # (start, measure) per step; the source of layer `start` is layer start-1's cached outputs.
    script = [(0, False), (0, True), (2, True), (L, False)]
    result, spy = run_scripted(rt, script)
    layers = [r for r in spy.records if r["part"].startswith("layer")]
    # Step 2 starts at layer 2 from layer 1's outputs of step 1: both carried tensors are those buffers.
    step1 = next(r for r in layers if r["step"] == 1 and r["part"] == "layer_001")
    step2 = next(r for r in layers if r["step"] == 2)
    assert step2["part"] == "layer_002"
    assert step2["in_ptr"]["hidden"] == step1["out_ptr"]["hidden_out"]
    assert step2["in_ptr"]["text"] == step1["out_ptr"]["text_out"]
    # Step 3 reuses everything: the head reads the last layer's cached video tokens.
    head3 = next(r for r in spy.records if r["step"] == 3 and r["part"] == "head")
    last = [r for r in layers if r["part"] == f"layer_{L - 1:03d}"][-1]
    assert head3["in_ptr"]["hidden"] == last["out_ptr"]["hidden_out"]
    assert result.stats["layer_calls_skipped"] == 2 + L and result.stats["bytes_copied"] == 0


def test_foresight_skips_layers_and_stays_close_to_full_compute(runtimes):
    rt = runtimes["onnxruntime"]
    full = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy="none", decode=False)
    fast = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy="foresight", warmup=4, recalculate=4,
                       threshold=4.0, decode=False)
    assert fast.stats["layer_calls_skipped"] > 0
    assert fast.stats["layer_engine_calls"] == fast.stats["layer_calls"] < full.stats["layer_calls"]
    assert not torch.equal(fast.latents, full.latents)
    assert torch.isfinite(fast.latents).all()


@pytest.mark.parametrize("frames, valid", [(5, "1 or 8"), (10, "9 or 16"), (12, "9 or 16")])
def test_frames_the_vae_cannot_make_are_refused_naming_valid_ones(runtimes, frames, valid):
    from runtime.errors import ShapeError

    with pytest.raises(ShapeError, match=f"--frames {valid}"):
        runtimes["onnxruntime"].generate(PROMPT, num_frames=frames, num_inference_steps=2, decode=False)


def test_cli_exports_and_runs_cogvideox(aoti_engines_dir, tmp_path, capsys):
    """foresight-export --model cogvideox --preset tiny (the session's CLI export), then foresight-run:
    a video, stats and heatmap."""
    import imageio.v3 as iio

    from runtime.cli import main as run_main

    engines = aoti_engines_dir
    out, stats, npy = tmp_path / "out.mp4", tmp_path / "stats.json", tmp_path / "frames.npy"
    code = run_main(["--engines", str(engines), "--prompt", PROMPT, "--out", str(out), "--steps", "8", "--frames", "8",
                     "--stats", str(stats), "--heatmap", str(tmp_path / "reuse.png"), "--save-frames", str(npy),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert iio.imread(out).shape == np.load(npy).shape == (8, 32, 32, 3)
    import json

    data = json.loads(stats.read_text())
    layers = len(json.loads((engines / "manifest.json").read_text())["parts"]["layers"])
    assert data["frames"] == 8 and data["num_layers"] == layers and (tmp_path / "reuse.png").is_file()
    code = run_main(["--engines", str(engines), "--prompt", PROMPT, "--out", str(tmp_path / "bad.gif"),
                     "--frames", "10"])
    err = capsys.readouterr().err
    assert code == 2 and "pass --frames 9 or 16" in err and "Traceback" not in err
    assert not (tmp_path / "bad.gif").exists()
    # diffusers' default tiles for this small VAE do not reproduce the frame size: refused, not written.
    code = run_main(["--engines", str(engines), "--prompt", PROMPT, "--out", str(tmp_path / "tiled.mp4"),
                     "--steps", "2", "--height", "64", "--width", "64", "--vae-tiling", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "without --vae-tiling" in err and not (tmp_path / "tiled.mp4").exists()


def test_vae_tiling_decodes_the_same_frame_count(exported, runtimes):
    """Tiles smaller than the frame: the tiled decode is a video of the same shape, close to the untiled one."""
    rt = runtimes["torch"]
    plain = rt.generate(PROMPT, num_inference_steps=2, seed=0, policy="none")
    tile = plain.frames.shape[1] // 2
    rt.parts.vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                               tile_overlap_factor_height=0.25, tile_overlap_factor_width=0.25)
    try:
        tiled = rt.parts.decode(plain.latents, plain.frames.shape[0])
    finally:
        rt.parts.vae.disable_tiling()
    assert tiled.shape == plain.frames.shape
    assert not np.array_equal(tiled, plain.frames)  # the tiles really were used



def test_runtime_reproduces_the_golden_traces(exported, runtimes):
    """tests/golden/cogvideox-<policy>.json (the tiny preset, 2B-style) and
    cogvideox-tiny-5b-<policy>.json (rotary, DPM)."""
    from tests.runtime.test_golden_runs import check_model

    check_model(runtimes["torch"], "cogvideox" if exported[0].name == "cogvideox-tiny" else "cogvideox-tiny-5b")
