"""A short training run learns (loss goes down) and saves a checkpoint the exporter loads."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from tools import train, training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "latte-mini"
    meta = train.main(["--out", str(out), "--clips", "48", "--vae-steps", "40", "--steps", "60",
                       "--batch", "4", "--layers", "2", "--seed", "3", "--layout", "cross", "--curriculum", "20",
                       "--vae-norm-groups", "1", "--foresight", '{"warmup": 4, "recalculate": 2, "threshold": 1.5}', "--guidance", "3.5"])
    return out, meta


def test_losses_decrease(trained):
    _, meta = trained
    vae = [e["recon"] for e in meta["log"] if e["stage"] == "vae"]
    dit = [e["loss"] for e in meta["log"] if e["stage"] == "transformer"]
    assert len(vae) == 40 and len(dit) == 60
    assert statistics.mean(vae[-10:]) < 0.5 * statistics.mean(vae[:10])
    assert statistics.mean(dit[-15:]) < statistics.mean(dit[:15])


def test_checkpoint_loads_like_a_real_one_and_exports(trained, tmp_path):
    from diffusers import LattePipeline

    from exporter.export import ExportOptions, export

    out, meta = trained
    pipe = LattePipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == 2
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)  # set from the trained latents
    assert pipe.vae.config.norm_num_groups == 1
    args = json.loads((out / "training.json").read_text())["args"]
    assert (args["steps"], args["layout"], args["curriculum"], args["curriculum_skew"]) == (60, "cross", 20, 3.0)
    engines = export(ExportOptions(model="latte", model_path=str(out), out=tmp_path / "e"), progress=False)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["foresight_defaults"] == {"warmup": 4, "recalculate": 2, "threshold": 1.5}
    assert manifest["pipeline"]["default_guidance"] == 3.5
    assert manifest["shapes"]["frames"]["max"] == 8


def test_colour_separation_is_the_latent_mse_between_colours(trained):
    import dataclasses
    import random

    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from tools import synthetic

    out, meta = trained
    separation = meta["vae_colour_separation"]
    assert set(separation) == set(synthetic.BACKGROUNDS)
    assert all(0 < v["min"] <= v["mean"] for v in separation.values())
    vae = AutoencoderKL.from_pretrained(out / "vae")
    base = synthetic.sample_spec(random.Random(1), layout="cross")  # the clip colour_separation renders
    z = {c: vae.encode(training.to_unit(synthetic.render(dataclasses.replace(base, color=c, background="navy"))))
         .latent_dist.mode() * vae.config.scaling_factor for c in synthetic.COLORS}
    pairs = [F.mse_loss(z[a], z[b]).item() for i, a in enumerate(z) for b in list(z)[i + 1:]]
    assert separation["navy"]["mean"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-3, abs=1e-5)
    assert separation["navy"]["min"] == pytest.approx(min(pairs), rel=1e-3, abs=1e-5)


def test_training_is_deterministic_for_a_seed(tmp_path):
    args = ["--clips", "16", "--vae-steps", "3", "--steps", "3", "--batch", "2", "--layers", "1", "--seed", "5"]
    a = train.main(["--out", str(tmp_path / "a"), *args])
    b = train.main(["--out", str(tmp_path / "b"), *args])
    assert [e.get("loss", e.get("recon")) for e in a["log"]] == [e.get("loss", e.get("recon")) for e in b["log"]]
    assert (tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_timestep_sampling_uniform_or_skewed_to_high_noise():
    import torch

    uniform = training.sample_timesteps(20000, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    skewed = training.sample_timesteps(20000, 2.0, torch.Generator().manual_seed(0))
    assert int(skewed.min()) >= 0 and int(skewed.max()) <= 999 and skewed.dtype == torch.int64
    assert abs(float(uniform.float().mean()) - 500) < 15
    assert abs(float(skewed.float().mean()) - 2000 / 3) < 15  # E[1 - (1-u)^2] = 2/3
    assert float((skewed >= 700).float().mean()) > 0.5 > float((uniform >= 700).float().mean())
    u = torch.tensor([0.0, 0.5, 0.9])
    assert torch.equal(training.skew_noise(u, 1.0), u)  # the rectified-flow recipe's continuous time
    assert torch.allclose(training.skew_noise(u, 2.0), torch.tensor([0.0, 0.75, 0.99]))


def test_curriculum_draws_one_colour_on_one_background_then_every_clip():
    import torch

    from tools.synthetic import dataset, parse_prompt

    prompts = [spec.prompt for spec, _ in dataset(300, seed=1, layout="cross")]
    subset = training.curriculum_indices(prompts)
    inside = {int(i) for i in subset}
    assert inside == {i for i, p in enumerate(prompts)
                      if parse_prompt(p)["color"] == "red" and parse_prompt(p)["background"] == "gray"}
    assert {parse_prompt(prompts[i])["direction"] for i in inside} == {"left", "right", "up", "down"}
    args = train.parse_args(["--steps", "10", "--curriculum", "4", "--batch", "64", "--timestep-skew", "1.5"])
    gen = torch.Generator().manual_seed(0)
    early = [training.draw_clips(step, args, subset, len(prompts), gen) for step in range(4)]
    late = training.draw_clips(4, args, subset, len(prompts), gen)
    assert all(int(i) in inside for batch in early for i in batch)
    assert not all(int(i) in inside for i in late)
    assert [training.skew_at(s, args) for s in (0, 3, 4, 9)] == [3.0, 3.0, 1.5, 1.5]
    with pytest.raises(ValueError, match="no clip is .*--curriculum 0"):
        training.curriculum_indices([p for p in prompts if "gray" not in p])
    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "10", "--curriculum", "11"])


def test_vae_norm_groups_default_per_model_and_checked():
    assert [training.vae_norm_groups(train.parse_args(["--model", m])) for m in ("latte", "cogvideox", "opensora")] == \
        [16, 8, 16]  # what the recorded preset commands were trained with
    assert training.vae_norm_groups(train.parse_args(["--model", "cogvideox", "--vae-norm-groups", "4"])) == 4
    with pytest.raises(SystemExit):
        train.parse_args(["--vae-norm-groups", "0"])


def test_word_tokenizer_round_trips_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tools.synthetic import vocabulary

    tok = training.word_tokenizer(vocabulary())
    ids = tok("A red square moving left on a black background").input_ids
    assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id and len(ids) == 10
    assert tok("a plaid blob").input_ids.count(tok.unk_token_id) == 2
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("a red square").input_ids == tok("a red square").input_ids


@pytest.mark.parametrize("model, groups", [("cogvideox", 4), ("opensora", 1)])
def test_other_architectures_train_and_export(model, groups, tmp_path):
    """tools/recipes.py: a short run of each recipe lowers the VAE and transformer losses and saves
    a folder that foresight-export loads through the same path as a released checkpoint."""
    from exporter.export import ExportOptions, export

    out = tmp_path / model
    meta = train.main(["--model", model, "--out", str(out), "--clips", "48", "--vae-steps", "30", "--vae-batch", "4",
                       "--steps", "60", "--batch", "4", "--layers", "2", "--seed", "3",
                       "--vae-norm-groups", str(groups), "--foresight", '{"warmup": 4, "recalculate": 2, "threshold": 1.5}'])
    vae = [e["recon"] for e in meta["log"] if e["stage"] == "vae"]
    dit = [e["loss"] for e in meta["log"] if e["stage"] == "transformer"]
    assert len(vae) == 30 and len(dit) == 60
    assert statistics.mean(vae[-8:]) < statistics.mean(vae[:8])
    assert statistics.mean(dit[-15:]) < statistics.mean(dit[:15])
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["norm_num_groups" if model == "cogvideox" else "spatial_norm_num_groups"] == groups
    engines = export(ExportOptions(model=model, model_path=str(out), out=tmp_path / "e"), progress=False)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["foresight_defaults"] == {"warmup": 4, "recalculate": 2, "threshold": 1.5}
    assert len(manifest["parts"]["layers"]) == 2
    assert manifest["shapes"]["frames"]["default"] == (9 if model == "cogvideox" else 17)


def test_wan_recipe_trains_and_exports_with_its_shape_and_text_length(tmp_path):
    """--model wan: WanPipeline's defaults are a release's (81 frames of 480x832, 512 text tokens), so the
    recipe writes the trained shape and text length to defaults.json, which the exporter reads; the VAE's
    latents are normalised with the per-channel mean and std it stores."""
    from exporter.export import pipeline_facts
    from exporter.families import get_family

    out = tmp_path / "wan"
    meta = train.main(["--model", "wan", "--out", str(out), "--clips", "24", "--vae-steps", "16", "--vae-batch", "2",
                       "--steps", "40", "--batch", "4", "--layers", "1", "--seed", "3", "--guidance", "4.0"])
    vae = [e["recon"] for e in meta["log"] if e["stage"] == "vae"]
    dit = [e["loss"] for e in meta["log"] if e["stage"] == "transformer"]
    assert statistics.mean(vae[-4:]) < statistics.mean(vae[:4])
    assert statistics.mean(dit[-10:]) < statistics.mean(dit[:10])
    defaults = json.loads((out / "defaults.json").read_text())
    assert defaults == {"guidance_scale": 4.0, "num_frames": 9, "height": 32, "width": 32, "max_sequence_length": 16}
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert len(vae_config["latents_std"]) == 4 and vae_config["latents_std"] != [1.0] * 4
    family = get_family("wan")
    loaded = family.load(str(out))  # the checkpoint loads as a released one does
    _, pipeline, _ = pipeline_facts(family, loaded.transformer, family.vae_config(loaded), loaded.source)
    assert (pipeline["default_frames"], pipeline["default_height"], pipeline["default_width"]) == (9, 32, 32)
    assert pipeline["max_text_length"] == 16 and pipeline["default_guidance"] == 4.0
    assert pipeline["vae_scale_factor"] == 4 and pipeline["vae_scale_factor_temporal"] == 4
    t = json.loads((out / "transformer" / "config.json").read_text())
    assert (t["num_attention_heads"], t["attention_head_dim"]) == (1, 64)  # --head-dim's Wan default
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "wan", "--vae-norm-groups", "1"])

    # --init continues the checkpoint: the VAE and its normalisation are kept bit for bit, the transformer
    # trains on from where it was (its first losses are the end's, not a fresh model's).
    more = tmp_path / "wan-more"
    meta2 = train.main(["--model", "wan", "--out", str(more), "--init", str(out), "--clips", "24", "--steps", "10",
                        "--batch", "4", "--seed", "3", "--lr", "1e-4"])
    assert not [e for e in meta2["log"] if e["stage"] == "vae"]
    assert json.loads((more / "vae" / "config.json").read_text())["latents_std"] == vae_config["latents_std"]
    from safetensors.torch import load_file

    before = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(more / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    t_before = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    t_after = load_file(more / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(t_before[k], t_after[k]) for k in t_before)
    resumed = [e["loss"] for e in meta2["log"] if e["stage"] == "transformer"]
    assert statistics.mean(resumed) < statistics.mean(dit[:10])
    assert meta2["args"]["layers"] == 1 and meta2["args"]["init"] == str(out)
    for part in ("vae", "transformer"):  # no path of the machine it was made on
        assert "_name_or_path" not in json.loads((more / part / "config.json").read_text())
    assert meta2["continued_from"] == [{"command": meta["command"], "seconds": meta["seconds"],
                                        "final_loss": meta["final_loss"]}]
    for bad in (["--model", "latte", "--init", str(out)], ["--model", "wan", "--init", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_head_dim_default_per_model_and_checked():
    assert [train.parse_args(["--model", m]).head_dim for m in ("latte", "cogvideox", "opensora", "wan")] == \
        [16, 16, 16, 64]  # wan: ten rotary frequencies per spatial axis instead of two
    assert train.parse_args(["--model", "wan", "--head-dim", "32"]).head_dim == 32
    for bad in ("0", "48"):  # 48 does not divide --hidden 64
        with pytest.raises(SystemExit):
            train.parse_args(["--model", "wan", "--head-dim", bad])


def test_foreground_weights_mark_the_object_and_default_per_model():
    import torch

    from tools import synthetic

    clip = next(iter(synthetic.dataset(1, seed=3, frames=2, height=32, width=32, layout="cross")))[1]
    x = training.to_unit(clip).movedim(0, 1)[None]  # (1, 3, F, H, W)
    w = training.foreground_weights(x, 20.0)
    assert w.shape == (1, 1, 2, 32, 32) and set(w.unique().tolist()) == {1.0, 21.0}
    share = (w > 1).float().mean().item()
    assert 0.005 < share < 0.2  # the object, not the background
    obj = w[0, 0, 0] > 1
    bg = x[0, :, 0][:, ~obj].mean(dim=1)
    assert torch.all((x[0, :, 0][:, obj] - bg[:, None]).abs().sum(dim=0) > 0.1)
    assert train.parse_args(["--model", "wan"]).vae_foreground_weight == 20.0
    assert train.parse_args(["--model", "cogvideox"]).vae_foreground_weight == 0.0
    with pytest.raises(SystemExit):
        train.parse_args(["--vae-foreground-weight", "-1"])


def test_a_zero_foreground_weight_is_plain_mse():
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                           scale_factor_spatial=2, scale_factor_temporal=2, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4)
    x = torch.full((2, 3, 5, 16, 16), -0.5)  # a flat background with an object: weights 1 and 21
    x[:, :, :, 4:8, 6:10] = torch.rand(2, 3, 5, 4, 4) * 0.5 + 0.5
    plain, _ = training.kl_vae_loss(vae, x, torch.Generator().manual_seed(1), 1e-4)
    zero, _ = training.kl_vae_loss(vae, x, torch.Generator().manual_seed(1), 1e-4, 0.0)
    weighted, _ = training.kl_vae_loss(vae, x, torch.Generator().manual_seed(1), 1e-4, 20.0)
    assert torch.equal(plain, zero) and not torch.equal(plain, weighted)
