"""The eager Open-Sora 1.2 pipeline (the runtime's oracle) on the tiny random checkpoint that
``tools/make_tiny.py --model opensora`` writes: folder layout, prompt encoding, the sampling loop
against a hand-written one, frames."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dit.opensora_pipeline import OpenSoraPipeline, to_frames
from dit.rflow import RFlowSampler
from runtime.errors import ModelError
from tools import make_tiny

PROMPT = "a red circle moving left on a blue background"


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny.make_opensora(tmp_path_factory.mktemp("opensora") / "tiny")


@pytest.fixture(scope="module")
def pipe(tiny) -> OpenSoraPipeline:
    return OpenSoraPipeline.from_pretrained(tiny)


def test_make_tiny_writes_the_layout_and_the_same_bytes_twice(tiny, tmp_path):
    got = files(tiny)
    assert set(got) == {
        "model_index.json", "defaults.json", "scheduler/scheduler_config.json",
        "transformer/config.json", "transformer/model.safetensors", "vae/config.json", "vae/model.safetensors",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    }
    index = json.loads(got["model_index.json"])
    assert index["_class_name"] == "OpenSoraPipeline"
    assert index["transformer"] == ["foresight", "STDiT3"] and index["vae"] == ["foresight", "OpenSoraVAE"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"] and index["tokenizer"][0] == "transformers"
    assert index["scheduler"] == ["foresight", "RFlowSampler"]
    assert json.loads(got["scheduler/scheduler_config.json"]) == {
        "_class_name": "RFlowSampler", "num_steps": 30, "guidance_scale": 7.0, "use_timestep_transform": True,
        "num_timesteps": 1000}
    assert json.loads(got["defaults.json"]) == {"num_frames": 17, "height": 64, "width": 64}
    assert sum(len(b) for b in got.values()) < 3_200_000

    # the CLI, twice into the same place (replaced, not merged) and once elsewhere: same bytes
    out = tmp_path / "again"
    for _ in range(2):
        assert make_tiny.main(["--model", "opensora", "--out", str(out)]) == 0
    assert files(out) == got
    assert not [p for p in tmp_path.iterdir() if p.name != "again"]  # no temporary siblings left


def test_from_pretrained_loads_what_make_tiny_made(pipe):
    components = make_tiny.opensora_components()
    for name in ("transformer", "vae", "text_encoder"):
        want, have = components[name].state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want), name
    assert pipe.transformer.config == components["transformer"].config
    assert pipe.vae.config == components["vae"].config  # read from vae/config.json
    assert pipe.scheduler == RFlowSampler()
    assert pipe.defaults == {"num_frames": 17, "height": 64, "width": 64}
    assert pipe.tokenizer(PROMPT).input_ids == components["tokenizer"](PROMPT).input_ids


@pytest.mark.parametrize("remove,named", [
    ("transformer/model.safetensors", "transformer/ weights"),
    ("vae/model.safetensors", "vae/ weights"),
    ("text_encoder", "text_encoder/"),
    ("tokenizer", "tokenizer/"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json"),
    ("model_index.json", "model_index.json"),
])
def test_incomplete_folder_names_the_missing_part(tiny, tmp_path, remove, named):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny, folder)
    target = folder / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ModelError) as err:
        OpenSoraPipeline.from_pretrained(folder)
    msg = str(err.value)
    assert f"missing: {named}" in msg
    for source in ("hpcai-tech/OpenSora-STDiT-v3", "hpcai-tech/OpenSora-VAE-v1.2", "DeepFloyd/t5-v1_1-xxl"):
        assert source in msg


def test_other_folders_are_refused(tiny, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        OpenSoraPipeline.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "pipe"
    shutil.copytree(tiny, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    with pytest.raises(ModelError, match="names 'CogVideoXPipeline', not OpenSoraPipeline"):
        OpenSoraPipeline.from_pretrained(folder)


# --------------------------------------------------------------------------- caption


def test_encode_prompt_appends_the_aesthetic_score(pipe):
    y, mask = pipe.encode_prompt(PROMPT)
    length = pipe.transformer.config.model_max_length
    assert y.shape == (1, length, 32) and y.dtype == torch.float32
    assert mask.shape == (1, length) and mask.dtype == torch.long

    want = pipe.tokenizer(PROMPT + " aesthetic score: 6.5.", max_length=length, padding="max_length",
                          truncation=True, add_special_tokens=True, return_tensors="pt")
    tokens = pipe.tokenizer.convert_ids_to_tokens(want.input_ids[0])
    assert tokens[:17] == [*PROMPT.split(), "aesthetic", "score", ":", "6", ".", "5", ".", "</s>"]
    assert int(mask.sum()) == 17 and torch.equal(mask, want.attention_mask)  # the mask counts the tokens
    with torch.no_grad():
        ref = pipe.text_encoder(want.input_ids, attention_mask=want.attention_mask).last_hidden_state
    assert torch.equal(y, ref)

    # the score is read into the caption; an explicit one is not appended twice; None = no suffix
    pipe_5 = OpenSoraPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, aesthetic_score=5.0)
    assert not torch.equal(pipe_5.encode_prompt(PROMPT)[0], y)
    assert torch.equal(pipe_5.encode_prompt(PROMPT + " aesthetic score: 6.5.")[0], y)
    bare = OpenSoraPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, aesthetic_score=None)
    assert int(bare.encode_prompt(PROMPT)[1].sum()) == len(PROMPT.split()) + 1


# --------------------------------------------------------------------------- sampling


def hand_rolled_latents(pipe, prompt, seed, steps, guidance, num_frames=17, height=64, width=64):
    """The release's loop written out: CFG batch [cond, uncond], y_embedding as the null caption."""
    model = pipe.transformer
    y, mask = pipe.encode_prompt(prompt)
    y_null = model.y_embedder.y_embedding[None]  # (1, L, C)
    z = torch.randn((1, 4, pipe.vae.latent_frames(num_frames), height // 8, width // 8),
                    generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)

    def f32(v):  # (2,) float32: the CFG batch's fps / height / width
        return torch.tensor([float(v)] * 2)

    ts = RFlowSampler(num_steps=steps).timesteps(torch.tensor([float(height)]), torch.tensor([float(width)]),
                                                 torch.tensor([float(num_frames)]))
    with torch.no_grad():
        for i, t in enumerate(ts):
            out = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, y_null])[:, None], torch.cat([mask, mask]),
                        fps=f32(24), height=f32(height), width=f32(width))
            v_cond, v_uncond = out[:, :4].chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
            t_next = ts[i + 1] if i + 1 < len(ts) else torch.zeros_like(t)
            z = z + v * ((t - t_next) / 1000).reshape(-1, 1, 1, 1, 1)
    return z


def test_latents_equal_the_hand_rolled_loop(pipe):
    z = pipe(PROMPT, seed=3, output_type="latent")  # the folder's defaults: 17 x 64 x 64, 30 steps, cfg 7
    assert z.shape == (1, 4, 5, 8, 8) and z.dtype == torch.float32
    assert torch.equal(z, hand_rolled_latents(pipe, PROMPT, seed=3, steps=30, guidance=7.0))
    assert torch.equal(pipe(PROMPT, seed=3, output_type="latent"), z)  # a second call is the first again

    z4 = pipe(PROMPT, seed=3, num_inference_steps=4, guidance_scale=4.5, output_type="latent")
    assert torch.equal(z4, hand_rolled_latents(pipe, PROMPT, seed=3, steps=4, guidance=4.5))
    assert not torch.equal(pipe(PROMPT, seed=4, num_inference_steps=4, guidance_scale=4.5, output_type="latent"), z4)


def test_the_null_caption_is_y_embedding_with_the_prompt_mask(pipe):
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args: seen.append(args), with_kwargs=False)
    try:
        pipe(PROMPT, num_inference_steps=2, output_type="latent")
    finally:
        hook.remove()
    y, mask = pipe.encode_prompt(PROMPT)
    assert len(seen) == 2
    _, timestep, y_in, mask_in = seen[0]
    assert y_in.shape == (2, 1, 24, 32)
    assert torch.equal(y_in[0, 0], y[0]) and torch.equal(y_in[1, 0], pipe.transformer.y_embedder.y_embedding)
    assert torch.equal(mask_in, torch.cat([mask, mask]))
    assert timestep[0] == timestep[1] and abs(float(timestep[0]) - 1000.0) < 1e-3  # transformed in fp32


def test_frames_are_the_decoded_latents_as_uint8(pipe):
    frames = pipe(PROMPT, seed=1, num_inference_steps=3)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.shape == (17, 64, 64, 3)
    z = pipe(PROMPT, seed=1, num_inference_steps=3, output_type="latent")
    with torch.no_grad():
        assert np.array_equal(frames, to_frames(pipe.vae.decode(z, 17)))
    assert not np.array_equal(frames, pipe(PROMPT, seed=2, num_inference_steps=3))


def test_to_frames_rounds_as_the_release_save_sample():
    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.5, 0.996, 1.0, 3.0])
    video = x.view(1, 1, 1, 1, -1).expand(1, 3, 2, 1, -1)  # (1, 3, F=2, H=1, W=8)
    frames = to_frames(video)
    assert frames.shape == (2, 1, 8, 3) and frames.dtype == np.uint8
    # floor((clamp(x, -1, 1) + 1) / 2 * 255 + 0.5)
    assert frames[0, 0, :, 0].tolist() == [0, 0, 0, 128, 191, 254, 255, 255]


def test_sizes_not_a_multiple_of_eight_floor_to_the_latent_grid(pipe):
    # the release's 240p 9:16 is 240 x 426: latents 426 // 8 = 53 wide, frames 424
    z = pipe(PROMPT, num_frames=17, height=64, width=70, num_inference_steps=1, output_type="latent")
    assert z.shape == (1, 4, 5, 8, 8)
    assert pipe(PROMPT, num_frames=1, height=16, width=26, num_inference_steps=1).shape == (1, 16, 24, 3)


def test_fps_is_24_for_a_video_and_120_for_one_frame(pipe):
    fps = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, args, kwargs: fps.append(kwargs["fps"]),
                                                      with_kwargs=True)
    try:
        pipe(PROMPT, num_inference_steps=1, output_type="latent")
        pipe(PROMPT, num_frames=1, num_inference_steps=1, output_type="latent")
        pipe(PROMPT, num_inference_steps=1, fps=8, output_type="latent")
    finally:
        hook.remove()
    assert [f.tolist() for f in fps] == [[24.0, 24.0], [120.0, 120.0], [8.0, 8.0]]
    assert all(f.dtype == torch.float32 for f in fps)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPT, output_type="pil")
    with pytest.raises(ValueError, match="height must be an int >= 8"):
        pipe(PROMPT, height=4)
    with pytest.raises(ValueError, match="1 frame or at least 17"):
        pipe(PROMPT, num_frames=9, num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        pipe([PROMPT])
