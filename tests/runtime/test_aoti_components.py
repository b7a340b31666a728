"""The text encoder and VAE decoder compiled by ``foresight-export --backend aoti`` (``aoti.components``):
listed and hashed like every part, validated against eager at export, and with
``Runtime.load(..., compiled_components=True)`` the runtime encodes and decodes with them as closely to
the eager modules as the compiled kernels' rounding allows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime import Runtime
from runtime.errors import ConfigError, ShapeError

PROMPT = "a red square moving left on a gray background"


@pytest.fixture(scope="module")
def latte_aoti(preset_engines):
    return preset_engines("latte", "tiny", backend="aoti")


def test_the_manifest_lists_both_components_with_their_dims_and_io(latte_aoti):
    m = json.loads((latte_aoti / "manifest.json").read_text())
    comps = m["aoti"]["components"]
    assert set(comps) == {"text_encoder", "vae_decoder"}
    assert [s["name"] for s in comps["text_encoder"]["inputs"]] == ["input_ids", "attention_mask"]
    assert comps["text_encoder"]["inputs"][0]["shape"] == ["B", 120] and comps["text_encoder"]["inputs"][0]["dtype"] == \
        "int64"
    assert comps["vae_decoder"]["dims"]["B"]["max"] == m["pipeline"]["decode_chunk_size"]
    for entry in comps.values():
        assert entry["program"] in m["aoti"]["programs"] and entry["weights"] in m["files"]
        assert m["aoti"]["programs"][entry["program"]]["file"] in m["files"]
        assert all(e < 1e-4 for v in entry["validation"] for e in v["max_rel_error"].values())


def test_compiled_components_encode_and_decode_as_the_eager_ones(latte_aoti):
    eager = Runtime.load(latte_aoti, backend="aoti", device="cpu")
    compiled = Runtime.load(latte_aoti, backend="aoti", device="cpu", compiled_components=True)
    a = eager.parts.encode_prompt(PROMPT, "", True)["encoder_hidden_states"]
    b = compiled.parts.encode_prompt(PROMPT, "", True)["encoder_hidden_states"]
    assert a.shape == b.shape and (b - a).abs().max() <= 1e-5 * a.abs().max()
    ref = eager.generate(PROMPT, num_inference_steps=6, seed=2, policy="none")
    got = compiled.generate(PROMPT, num_inference_steps=6, seed=2, policy="none")
    assert got.frames.shape == ref.frames.shape
    diff = np.abs(got.frames.astype(int) - ref.frames.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())  # rounding, not a different video


@pytest.fixture(scope="module")
def video_folders(preset_engines, aoti_engines_dir):
    """The other pipelines' AOTI folders (their VAEs decode video: compiled for the default frame count)."""
    return {"cogvideox": aoti_engines_dir, "opensora": preset_engines("opensora", "tiny", backend="aoti"),
            "wan": preset_engines("wan", "tiny-random-a14b", backend="aoti")}


VIDEO_PROMPTS = {"cogvideox": ("a yellow triangle moving down on a white background", ""),
                 "opensora": ("a green square moving up on a black background", None),
                 "wan": ("a blue circle moving right", "blurry")}


@pytest.mark.parametrize("family", sorted(VIDEO_PROMPTS))
def test_every_pipelines_components_encode_and_decode_as_the_eager_ones(video_folders, family):
    folder = video_folders[family]
    m = json.loads((folder / "manifest.json").read_text())
    comps = m["aoti"]["components"]
    assert comps["text_encoder"]["inputs"][0]["shape"] == ["B", m["pipeline"]["max_text_length"]]
    latent_frames, frames = comps["vae_decoder"]["inputs"][0]["shape"][2], comps["vae_decoder"]["outputs"][0]["shape"][2]
    assert isinstance(latent_frames, int) and frames == m["shapes"]["frames"]["default"]
    assert all(e < 1e-4 for entry in comps.values() for v in entry["validation"] for e in v["max_rel_error"].values())
    prompt, negative = VIDEO_PROMPTS[family]
    eager = Runtime.load(folder, backend="aoti", device="cpu")
    compiled = Runtime.load(folder, backend="aoti", device="cpu", compiled_components=True)
    a, b = (rt.parts.encode_prompt(prompt, negative, True) for rt in (eager, compiled))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and (b[k] - a[k]).abs().max() <= 1e-5 * a[k].abs().max(), k
    ref = eager.generate(prompt, negative_prompt=negative, num_inference_steps=4, seed=2, policy="none")
    got = compiled.generate(prompt, negative_prompt=negative, num_inference_steps=4, seed=2, policy="none")
    assert got.frames.shape == ref.frames.shape == (frames, *ref.frames.shape[1:])
    diff = np.abs(got.frames.astype(int) - ref.frames.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, (diff.max(), diff.mean())
    # another frame count than the compiled one: refused before denoising, saying what to pass; the
    # latents of it are still made (decode=False)
    other = frames + (8 if family != "wan" else 4)
    with pytest.raises(ShapeError, match=f"frames={other}: the compiled VAE decoder makes {frames} frames .* pass "
                                         f"--frames {frames}, or run without --compiled-components"):
        compiled.generate(prompt, negative_prompt=negative, num_frames=other, num_inference_steps=2, seed=2)
    assert compiled.generate(prompt, negative_prompt=negative, num_frames=other, num_inference_steps=2, seed=2,
                             decode=False).latents.shape[2 if family != "cogvideox" else 1] != latent_frames


def test_a_folder_without_compiled_components_is_refused(engines_dir):
    with pytest.raises(ConfigError, match="has no compiled text encoder and VAE decoder: export it with"):
        Runtime.load(engines_dir, backend="onnxruntime", device="cpu", compiled_components=True)
