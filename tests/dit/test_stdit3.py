"""STDiT3 (Open-Sora 1.2): released key layout, forward semantics, the stem/layer/head split,
checkpoint loading and the rectified-flow sampler. Full size only on the meta device."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dit.rflow import RFlowSampler, timestep_transform
from dit.stdit3 import (
    STDiT3, STDiT3Config, cfg_model_fn, load_stdit3, pos_embed_2d, timestep_sinusoid,
)

TINY = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=8)


def released_keys() -> dict:
    """Every state_dict key and shape of hpcai-tech/OpenSora-STDiT-v3, from the spec's tables."""
    C, C6, T5 = 1152, 6912, 4096
    keys = {
        "rope.freqs": (36,),
        "x_embedder.proj.weight": (C, 4, 1, 2, 2), "x_embedder.proj.bias": (C,),
        "t_block.1.weight": (C6, C), "t_block.1.bias": (C6,),
        "y_embedder.y_embedding": (300, T5),
        "y_embedder.y_proj.fc1.weight": (C, T5), "y_embedder.y_proj.fc1.bias": (C,),
        "y_embedder.y_proj.fc2.weight": (C, C), "y_embedder.y_proj.fc2.bias": (C,),
        "final_layer.scale_shift_table": (2, C),
        "final_layer.linear.weight": (32, C), "final_layer.linear.bias": (32,),
    }
    for emb in ("t_embedder", "fps_embedder"):
        keys.update({f"{emb}.mlp.0.weight": (C, 256), f"{emb}.mlp.0.bias": (C,),
                     f"{emb}.mlp.2.weight": (C, C), f"{emb}.mlp.2.bias": (C,)})
    block = {
        "scale_shift_table": (6, C),
        "attn.qkv.weight": (3 * C, C), "attn.qkv.bias": (3 * C,),
        "attn.q_norm.weight": (72,), "attn.k_norm.weight": (72,),
        "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
        "cross_attn.q_linear.weight": (C, C), "cross_attn.q_linear.bias": (C,),
        "cross_attn.kv_linear.weight": (2 * C, C), "cross_attn.kv_linear.bias": (2 * C,),
        "cross_attn.proj.weight": (C, C), "cross_attn.proj.bias": (C,),
        "mlp.fc1.weight": (4 * C, C), "mlp.fc1.bias": (4 * C,),
        "mlp.fc2.weight": (C, 4 * C), "mlp.fc2.bias": (C,),
    }
    assert len(block) == 17
    for kind in ("spatial_blocks", "temporal_blocks"):
        for i in range(28):
            keys.update({f"{kind}.{i}.{k}": v for k, v in block.items()})
    return keys


def test_released_config_keys_and_shapes_on_meta():
    with torch.device("meta"):
        model = STDiT3(STDiT3Config.xl2())
    assert STDiT3Config() == STDiT3Config.xl2()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = released_keys()
    assert len(expected) == 973
    assert got == expected
    n = sum(p.numel() for p in model.parameters())
    assert 1.19e9 < n < 1.22e9, n  # ~1.21B (y_embedding is a buffer)
    assert "y_embedder.y_embedding" in dict(model.named_buffers())


def test_config_validates():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        STDiT3Config(hidden_size=64, num_heads=5)
    assert STDiT3Config.from_dict({**TINY.to_dict(), "enable_flash_attn": True, "model_type": "STDiT3"}) == TINY


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return STDiT3(TINY).eval()


def inputs(b=2, t=3, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, 4, t, h, w, generator=g),
        timestep=torch.tensor([700.0, 30.0][:b] + [400.0] * max(0, b - 2)),
        y=torch.randn(b, 1, TINY.model_max_length, TINY.caption_channels, generator=g),
        mask=torch.tensor([[1] * 5 + [0] * 3, [1] * 8][:b] + [[1] * 3 + [0] * 5] * max(0, b - 2)),
        fps=torch.full((b,), 24.0), height=torch.full((b,), 8.0 * h), width=torch.full((b,), 8.0 * w),
    )


@pytest.mark.parametrize("t,h,w", [(3, 8, 8), (2, 7, 9)])
def test_forward_shape_and_crop(model, t, h, w):
    out = model(**inputs(t=t, h=h, w=w))
    assert out.shape == (2, 8, t, h, w) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_temporal_patch_padding():
    torch.manual_seed(0)
    m = STDiT3(STDiT3Config(depth=1, hidden_size=32, num_heads=2, patch_size=(2, 2, 2),
                            caption_channels=32, model_max_length=8)).eval()
    assert m(**inputs(t=3, h=5, w=6)).shape == (2, 8, 3, 5, 6)


def test_split_is_exact(model):
    a = inputs(h=7, w=9)
    with torch.no_grad():
        full = model(**a)
        s = model.stem(a["x"], a["timestep"], a["y"], a["mask"], fps=a["fps"], height=a["height"], width=a["width"])
        assert s.x.shape == (2, 3, 4 * 5, 64) and s.t_mlp.shape == (2, 6 * 64) and s.t.shape == (2, 64)
        assert s.y.shape == (2, 8, 64) and s.y_mask.dtype == torch.bool
        h = s.x
        for i in range(TINY.depth):
            spatial, h = model.layer(i)(h, s.t_mlp, s.y, s.y_mask)
            assert spatial.shape == h.shape == s.x.shape
            assert not torch.equal(spatial, h)
        assert torch.equal(model.head(h, s.t, (3, 7, 9)), full)


def test_padded_caption_equals_per_sample_valid_tokens(model):
    a = inputs()
    with torch.no_grad():
        batched = model(**a)
        for i in range(2):
            n = int(a["mask"][i].sum())
            one = {k: v[i:i + 1] for k, v in a.items()}
            one["y"], one["mask"] = one["y"][:, :, :n], None  # only its valid tokens, no padding
            torch.testing.assert_close(batched[i:i + 1], model(**one), rtol=1e-5, atol=1e-6)
        # padded token values never matter
        b = dict(a, y=a["y"].clone())
        b["y"][0, :, 5:] = 100.0
        torch.testing.assert_close(model(**b), batched, rtol=1e-5, atol=1e-6)
        # a prompt mask (B', L) is tiled over the batch, as for the CFG batch
        tiled = dict(a, mask=a["mask"][:1])
        two = dict(a, mask=a["mask"][:1].repeat(2, 1))
        assert torch.equal(model(**tiled), model(**two))


def test_x_mask(model):
    a = inputs()
    with torch.no_grad():
        base = model(**a)
        assert torch.equal(model(**a, x_mask=torch.ones(2, 3, dtype=torch.bool)), base)
        x_mask = torch.tensor([[True, False, True], [True, True, True]])
        assert not torch.allclose(model(**a, x_mask=x_mask)[0], base[0])

        # Block level: frames where x_mask is False take the t0 modulation. The spatial
        # block works frame by frame, so a mixed mask is a per-frame choice between runs.
        s = model.stem(a["x"], a["timestep"], a["y"], a["mask"], fps=a["fps"], height=a["height"],
                       width=a["width"], x_mask=x_mask)
        blk = model.spatial_blocks[0]
        mixed = blk(s.x, s.t_mlp, s.y, s.y_mask, x_mask, s.t0_mlp)
        with_t, with_t0 = blk(s.x, s.t_mlp, s.y, s.y_mask), blk(s.x, s.t0_mlp, s.y, s.y_mask)
        assert torch.equal(mixed, torch.where(x_mask[:, :, None, None], with_t, with_t0))
        # t0 is the embedding of timestep 0
        s0 = model.stem(a["x"], torch.zeros(2), a["y"], a["mask"], fps=a["fps"], height=a["height"], width=a["width"])
        assert torch.equal(s.t0_mlp, s0.t_mlp) and torch.equal(s.t0, s0.t)

        # Final layer, all frames masked: the release normalises the modulated tensor again.
        fl = model.final_layer
        none = torch.zeros(2, 3, dtype=torch.bool)
        m1 = fl.norm_final(s.x) * (1 + fl.scale_shift_table[1] + s.t[:, None, None]) + fl.scale_shift_table[0] + s.t[:, None, None]
        m0 = fl.norm_final(m1) * (1 + fl.scale_shift_table[1] + s.t0[:, None, None]) + fl.scale_shift_table[0] + s.t0[:, None, None]
        torch.testing.assert_close(fl(s.x, s.t, none, s.t0), fl.linear(m0))


def test_rope_rotates_interleaved_pairs(model):
    d = TINY.head_dim
    freqs = model.rope.freqs
    torch.testing.assert_close(freqs, 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    x = torch.randn(1, 1, 5, d, generator=torch.Generator().manual_seed(3))
    out = model.rope.rotate_queries_or_keys(x)
    for p in range(5):
        for j in range(d // 2):
            a, c, s = x[0, 0, p, 2 * j], math.cos(p * freqs[j].item()), math.sin(p * freqs[j].item())
            b = x[0, 0, p, 2 * j + 1]
            torch.testing.assert_close(out[0, 0, p, 2 * j], a * c - b * s)
            torch.testing.assert_close(out[0, 0, p, 2 * j + 1], b * c + a * s)
    assert torch.equal(out[..., 0, :], x[..., 0, :])  # position 0 is unrotated


def test_rope_in_temporal_blocks_only(model):
    assert all(b.attn.rope is None for b in model.spatial_blocks)
    assert all(b.attn.rope is not None for b in model.temporal_blocks)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        sp = model.spatial_blocks[0].attn
        torch.testing.assert_close(sp(x[:, perm]), sp(x)[:, perm])  # no positions: permutation-equivariant
        tp = model.temporal_blocks[0].attn
        assert not torch.allclose(tp(x[:, perm]), tp(x)[:, perm], atol=1e-4)  # RoPE positions


def test_pos_embed_formula():
    dim, h, w, base = 8, 2, 3, 2
    scale = torch.tensor(1.25)
    got = pos_embed_2d(dim, h, w, scale, base)
    f = [1.0, 1.0 / 10000 ** 0.5]  # 1/10000^(arange(0, 4, 2) / 4)
    for r in range(h):
        for c in range(w):
            row, col = r / 1.25 * base / h, c / 1.25 * base / w
            want = ([math.sin(col * x) for x in f] + [math.cos(col * x) for x in f]
                    + [math.sin(row * x) for x in f] + [math.cos(row * x) for x in f])
            torch.testing.assert_close(got[r * w + c], torch.tensor(want))
    # first half encodes the column: tokens of one column share it
    assert torch.equal(got[0, :4], got[w, :4]) and not torch.equal(got[0, :4], got[1, :4])


def test_timestep_sinusoid_is_cos_then_sin():
    t = torch.tensor([0.0, 250.0])
    e = timestep_sinusoid(t)
    assert e.shape == (2, 256)
    assert torch.equal(e[0, :128], torch.ones(128)) and torch.equal(e[0, 128:], torch.zeros(128))
    f = torch.exp(-math.log(1e4) * torch.arange(128).float() / 128)
    torch.testing.assert_close(e[1], torch.cat([torch.cos(250 * f), torch.sin(250 * f)]))


# --------------------------------------------------------------------------- loading


def test_load_round_trip(model, tmp_path):
    sd = model.state_dict()
    a = inputs()
    with torch.no_grad():
        want = model(**a)

    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    loaded = load_stdit3(tmp_path / "w.safetensors")  # config read off the shapes
    assert loaded.config == TINY
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(**a), want)

    hub = tmp_path / "hub"  # the hub layout: config.json + model.safetensors
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({**TINY.to_dict(), "model_type": "STDiT3", "enable_flash_attn": True}))
    save_file({k: v.contiguous() for k, v in sd.items()}, hub / "model.safetensors")
    assert load_stdit3(hub).config == TINY

    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pt")
    assert torch.equal(load_stdit3(tmp_path / "w.pt", config=TINY).y_embedder.y_embedding,
                       sd["y_embedder.y_embedding"])


def test_load_accepts_missing_rope_freqs(model):
    sd = {k: v for k, v in model.state_dict().items() if k != "rope.freqs"}
    loaded = load_stdit3(sd, config=TINY)
    assert torch.equal(loaded.rope.freqs, model.rope.freqs)


def test_load_errors_name_the_keys(model):
    sd = dict(model.state_dict())
    del sd["temporal_blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: temporal_blocks\.1\.mlp\.fc2\.bias"):
        load_stdit3(sd, config=TINY)
    sd = dict(model.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        load_stdit3(sd, config=TINY)
    assert load_stdit3(sd, config=TINY, strict=False).config == TINY
    with pytest.raises(ValueError, match="shape mismatches: final_layer.scale_shift_table"):
        load_stdit3(dict(model.state_dict(), **{"final_layer.scale_shift_table": torch.zeros(3, 64)}), config=TINY)


# --------------------------------------------------------------------------- sampler


def test_timestep_transform_values():
    t = torch.tensor([1000.0, 500.0, 100.0])
    torch.testing.assert_close(timestep_transform(t, 512, 512, 1), t)  # r = 1
    r = math.sqrt(15)  # 512x512, 51 frames: 51 // 17 * 5 = 15 latent frames
    want = torch.tensor([1000.0, r * 0.5 / (1 + (r - 1) * 0.5) * 1000, r * 0.1 / (1 + (r - 1) * 0.1) * 1000])
    torch.testing.assert_close(timestep_transform(t, 512, 512, 51), want)
    r = math.sqrt(480 * 848) / 512  # 480p image
    torch.testing.assert_close(timestep_transform(torch.tensor([500.0]), 480, 848, 1),
                               torch.tensor([r * 0.5 / (1 + (r - 1) * 0.5) * 1000]))
    with pytest.raises(ValueError, match="at least 17"):
        timestep_transform(t, 512, 512, 16)


def test_schedule():
    ts = RFlowSampler(use_timestep_transform=False).timesteps(512, 512, 51, batch_size=2)
    assert len(ts) == 30 and torch.equal(ts[0], torch.full((2,), 1000.0))
    torch.testing.assert_close(ts[29], torch.full((2,), 1000.0 / 30))
    ts = RFlowSampler().timesteps(512, 512, 51)
    torch.testing.assert_close(ts[0], torch.tensor([1000.0]))
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_sampler_lands_on_x0_for_exact_velocity():
    g = torch.Generator().manual_seed(5)
    x0, eps = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)

    def exact(z_in, t_in):  # v = x0 - eps, read off x_t = (1 - s) x0 + s eps
        s = (t_in / 1000).reshape(-1, 1, 1, 1, 1)
        return torch.cat([(torch.cat([x0, x0]) - z_in) / s] * 2, dim=1)  # 8 channels, like STDiT3

    sampler = RFlowSampler(num_steps=10)
    z = sampler.sample(exact, eps, sampler.timesteps(512, 512, 51, batch_size=2))
    torch.testing.assert_close(z, x0, rtol=1e-4, atol=1e-4)


def test_sampler_cfg_combine():
    z0 = torch.zeros(1, 4, 1, 2, 2)

    def const(z_in, t_in):  # conditional half predicts 1, unconditional 3
        return torch.cat([torch.ones_like(z0), 3 * torch.ones_like(z0)])

    sampler = RFlowSampler(num_steps=4, guidance_scale=7.0, use_timestep_transform=False)
    z = sampler.sample(const, z0, sampler.timesteps(512, 512, 1))
    torch.testing.assert_close(z, torch.full_like(z0, 3 + 7 * (1 - 3)))  # sum(dt) = 1


def test_cfg_null_branch_uses_first_rows_of_y_embedding(model):
    a = inputs()
    fn = cfg_model_fn(model, a["y"], a["mask"], fps=a["fps"], height=a["height"], width=a["width"])
    with torch.no_grad():
        out = fn(torch.cat([a["x"], a["x"]]), torch.cat([a["timestep"], a["timestep"]]))
        torch.testing.assert_close(out[:2], model(**a))
        for i in range(2):
            n = int(a["mask"][i].sum())  # the paired prompt's token count
            null = model.y_embedder.y_embedding[None, None, :n]
            one = {k: v[i:i + 1] for k, v in a.items()}
            torch.testing.assert_close(out[2 + i:3 + i], model(**dict(one, y=null, mask=None)), rtol=1e-5, atol=1e-6)


def test_sampler_on_tiny_model(model):
    a = inputs(b=1)
    sampler = RFlowSampler(num_steps=3)
    fn = cfg_model_fn(model, a["y"], a["mask"], fps=24, height=64, width=64)
    with torch.no_grad():
        z = sampler.sample(fn, a["x"], sampler.timesteps(64, 64, 51))
    assert z.shape == a["x"].shape and torch.isfinite(z).all()
