"""Open-Sora 1.2 end to end: the shipped tiny checkpoint exports, and the runtime with policy none
reproduces our eager reference pipeline (dit.opensora_pipeline) for the same prompt
and seed — bit for bit on the torch backend; two probes per layer; bad inputs refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.runtime.test_engine import run_scripted

PROMPT = "a red square moving left on a black background"
STEPS = 6


@pytest.fixture(scope="module")
def exported(preset_engines):
    """The tiny preset, exported once for the session: the AOTInductor export (which the C++ tests use
    too) holds the same ONNX files as ``foresight-export --model opensora --preset tiny``."""
    from exporter.families import get_family

    return get_family("opensora").presets["tiny"], preset_engines("opensora", "tiny", backend="aoti")


@pytest.fixture(scope="module")
def runtimes(exported):
    from runtime import Runtime

    _, engines = exported
    return {b: Runtime.load(engines, backend=b, device="cpu") for b in ("torch", "onnxruntime")}


@pytest.fixture(scope="module")
def reference_pipe(exported):
    from dit.opensora_pipeline import OpenSoraPipeline

    return OpenSoraPipeline.from_pretrained(exported[0])


def reference(pipe, frames, height, width, seed=0, guidance=7.0):
    kwargs = dict(num_frames=frames, height=height, width=width, num_inference_steps=STEPS, guidance_scale=guidance,
                  seed=seed)
    return pipe(PROMPT, output_type="latent", **kwargs), pipe(PROMPT, output_type="np", **kwargs)


def default_size(rt) -> tuple[int, int, int]:
    shapes = rt.manifest.shapes
    return shapes["frames"]["default"], shapes["height"]["default"], shapes["width"]["default"]


@pytest.mark.parametrize("other", [False, True], ids=["default size", "other size"])
def test_torch_backend_is_bit_identical_to_the_reference_pipeline(reference_pipe, runtimes, other):
    frames, height, width = default_size(runtimes["torch"])
    if other:  # 20 frames (a partial VAE chunk), one grid step shorter and one wider
        step = runtimes["torch"].manifest.shapes["height"]["multiple_of"]
        frames, height, width = 20, height - step, width + step
    latents, video = reference(reference_pipe, frames, height, width)
    result = runtimes["torch"].generate(PROMPT, num_frames=frames, height=height, width=width,
                                        num_inference_steps=STEPS, seed=0, policy="none")
    assert result.latents.shape == latents.shape
    assert torch.equal(result.latents, latents)
    assert result.frames.shape == video.shape == (frames, height, width, 3)
    assert np.array_equal(result.frames, video)


def test_onnxruntime_backend_matches_the_reference_pipeline(reference_pipe, runtimes):
    latents, video = reference(reference_pipe, *default_size(runtimes["onnxruntime"]))
    result = runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none")
    rel = float((result.latents - latents).abs().max() / latents.abs().max())
    assert rel < 1e-4
    assert np.abs(result.frames.astype(int) - video.astype(int)).max() <= 1


def test_the_null_caption_is_the_models_y_embedding(reference_pipe, runtimes):
    cond = runtimes["onnxruntime"].parts.encode_prompt(PROMPT, None, guidance=True)
    y_embedding = reference_pipe.transformer.y_embedder.y_embedding
    assert torch.equal(cond["caption"][1], y_embedding[: cond["caption"].shape[1]])
    assert torch.equal(cond["caption_mask"][0], cond["caption_mask"][1])
    ids = reference_pipe.tokenizer(PROMPT + " aesthetic score: 6.5.").input_ids
    assert int(cond["caption_mask"][0].sum()) == len(ids)


def test_two_probes_per_layer_and_reuse_binds_cached_buffers(runtimes):
    rt = runtimes["onnxruntime"]
    assert tuple(rt.probes) == ("spatial", "hidden_out")
    L = rt.num_layers
    # (start, measure) per step; the source of layer `start` is layer start-1's cached outputs.
    script = [(0, False), (0, True), (2, True)]
    result, spy = run_scripted(rt, script)
    layers = [r for r in spy.records if r["part"].startswith("layer")]
    step1 = next(r for r in layers if r["step"] == 1 and r["part"] == "layer_001")
    step2 = next(r for r in layers if r["step"] == 2)
    assert step2["part"] == "layer_002" and step2["in_ptr"]["hidden"] == step1["out_ptr"]["hidden_out"]
    # the caption mask every layer reads is the stem's input buffer
    stem = next(r for r in spy.records if r["part"] == "stem")
    assert step2["in_ptr"]["caption_mask"] == stem["in_ptr"]["caption_mask"]
    assert result.stats["layer_calls_skipped"] == 2 and L == len(rt.manifest.layers)


def test_foresight_skips_layers(runtimes):
    rt = runtimes["onnxruntime"]
    full = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy="none", decode=False)
    fast = rt.generate(PROMPT, num_inference_steps=12, seed=0, policy="foresight", warmup=4, recalculate=4,
                       threshold=4.0, decode=False)
    assert 0 < fast.stats["layer_calls_skipped"] and fast.stats["layer_engine_calls"] < full.stats["layer_calls"]
    assert torch.isfinite(fast.latents).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"num_frames": 16}, r"outside the exported range \[17, 102\]"),
    ({"negative_prompt": "blurry"}, "null caption"),
    ({"num_frames": 103}, "outside the exported range"),
])
def test_bad_inputs_are_refused(runtimes, kwargs, message):
    from runtime.errors import ShapeError

    with pytest.raises(ShapeError, match=message):
        runtimes["onnxruntime"].generate(PROMPT, num_inference_steps=2, decode=False, **kwargs)


def test_cli_runs_opensora(exported, tmp_path, capsys):
    """foresight-run on the exported folder writes the video and frames."""
    import imageio.v3 as iio

    from runtime.cli import main as run_main

    _, engines = exported
    out, npy = tmp_path / "out.mp4", tmp_path / "frames.npy"
    code = run_main(["--engines", str(engines), "--prompt", PROMPT, "--out", str(out), "--steps", "6",
                     "--save-frames", str(npy), "--heatmap", str(tmp_path / "reuse.png"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    import json

    shapes = json.loads((engines / "manifest.json").read_text())["shapes"]
    want = (shapes["frames"]["default"], shapes["height"]["default"], shapes["width"]["default"], 3)
    assert iio.imread(out).shape == np.load(npy).shape == want



def test_runtime_reproduces_the_golden_traces(runtimes):
    """tests/golden/opensora-<policy>.json were recorded from the tiny preset."""
    from tests.runtime.test_golden_runs import check_model

    check_model(runtimes["torch"], "opensora")
