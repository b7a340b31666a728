"""Open-Sora 1.2 VAE (OpenSoraVAE_V1_2): released key layout, frame bookkeeping, causality,
normalisation and strict loading. Full size only on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dit.opensora_vae import (
    CausalConv3d, DiagonalGaussian, OpenSoraVAE, OpenSoraVAEConfig, TemporalVAE, depth_to_space_time,
    load_opensora_vae,
)
from dit.stdit3 import CheckpointMismatchError
from runtime.errors import ModelError

# 8x spatial, 4x temporal like the release; every width tiny.
TINY = OpenSoraVAEConfig(spatial_block_out_channels=(8, 8, 8, 8), spatial_layers_per_block=1,
                         spatial_norm_num_groups=4, temporal_filters=8, temporal_num_res_blocks=1,
                         temporal_num_groups=4)


def released_temporal_keys() -> dict:
    """Every ``temporal_vae.*`` key and shape of VAE_Temporal_SD, read off the release's
    vae_temporal.py (filters 128, multipliers (1, 2, 2, 4), 4 res blocks, downsample (F, T, T))."""
    keys = {}

    def res(prefix, cin, cout):
        keys.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
                     f"{prefix}.conv1.conv.weight": (cout, cin, 3, 3, 3),
                     f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
                     f"{prefix}.conv2.conv.weight": (cout, cout, 3, 3, 3)})
        if cin != cout:  # 1x1x1 shortcut, bias=False like conv1/conv2
            keys[f"{prefix}.conv3.conv.weight"] = (cout, cin, 1, 1, 1)

    def conv(prefix, cout, cin, k, bias=True):
        keys[f"{prefix}.conv.weight"] = (cout, cin, k, k, k)
        if bias:
            keys[f"{prefix}.conv.bias"] = (cout,)

    e, d = "temporal_vae.encoder", "temporal_vae.decoder"
    conv(f"{e}.conv_in", 128, 4, 3, bias=False)
    for stage, (cin, cout) in enumerate([(128, 128), (128, 256), (256, 256), (256, 512)]):
        for j in range(4):
            res(f"{e}.block_res_blocks.{stage}.{j}", cin if j == 0 else cout, cout)
    conv(f"{e}.conv_blocks.1", 256, 256, 3)  # conv_blocks.0 is an Identity (no temporal downsample)
    conv(f"{e}.conv_blocks.2", 256, 256, 3)
    for j in range(4):
        res(f"{e}.res_blocks.{j}", 512, 512)
    keys.update({f"{e}.norm1.weight": (512,), f"{e}.norm1.bias": (512,)})
    conv(f"{e}.conv2", 8, 512, 1)
    conv("temporal_vae.quant_conv", 8, 8, 1)
    conv("temporal_vae.post_quant_conv", 4, 4, 1)
    conv(f"{d}.conv1", 512, 4, 3)
    for j in range(4):
        res(f"{d}.res_blocks.{j}", 512, 512)
    for stage, (cin, cout) in {3: (512, 512), 2: (512, 256), 1: (256, 256), 0: (256, 128)}.items():
        for j in range(4):
            res(f"{d}.block_res_blocks.{stage}.{j}", cin if j == 0 else cout, cout)
    conv(f"{d}.conv_blocks.1", 512, 256, 3)   # 256 -> 2 * 256, depth-to-space in time
    conv(f"{d}.conv_blocks.2", 1024, 512, 3)  # 512 -> 2 * 512
    keys.update({f"{d}.norm1.weight": (128,), f"{d}.norm1.bias": (128,)})
    conv(f"{d}.conv_out", 4, 128, 3)
    return keys


def test_released_config_keys_and_shapes_on_meta():
    assert OpenSoraVAEConfig() == OpenSoraVAEConfig(
        spatial_block_out_channels=(128, 256, 512, 512), temporal_filters=128, temporal_num_res_blocks=4,
        temporal_channel_multipliers=(1, 2, 2, 4), temporal_downsample=(False, True, True), micro_frame_size=17)
    with torch.device("meta"):
        model = OpenSoraVAE()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    temporal = {k: v for k, v in got.items() if k.startswith("temporal_vae.")}
    expected = released_temporal_keys()
    assert len(expected) == 267  # encoder 131 + decoder 132 + quant convs 4
    assert sorted(set(expected) - set(temporal)) == [] and sorted(set(temporal) - set(expected)) == []
    assert temporal == expected

    spatial = {k: v for k, v in got.items() if k.startswith("spatial_vae.module.")}
    assert len(spatial) == 248  # the SDXL VAE's diffusers state dict
    assert sum(model.spatial_vae.module.state_dict()[k[len("spatial_vae.module."):]].numel() for k in spatial) \
        == 83_653_863
    for k, shape in {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (8, 512, 3, 3),
                     "quant_conv.weight": (8, 8, 1, 1), "post_quant_conv.weight": (4, 4, 1, 1),
                     "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
                     "decoder.up_blocks.3.resnets.2.conv2.weight": (128, 128, 3, 3),
                     "decoder.conv_out.weight": (3, 128, 3, 3)}.items():
        assert spatial[f"spatial_vae.module.{k}"] == shape

    assert got["scale"] == got["shift"] == (1, 4, 1, 1, 1)
    assert set(got) == set(temporal) | set(spatial) | {"scale", "shift"} and len(got) == 517


def test_normalisation_buffers_hold_the_release_values():
    model = OpenSoraVAE(TINY)
    torch.testing.assert_close(model.shift.flatten(), torch.tensor([-0.10, 0.34, 0.27, 0.98]))
    torch.testing.assert_close(model.scale.flatten(), torch.tensor([3.85, 2.32, 2.33, 3.06]))
    assert {"scale", "shift"} <= set(model.state_dict())


def test_config_validates():
    with pytest.raises(ValueError, match="temporal_downsample needs one flag per stage transition"):
        OpenSoraVAEConfig(temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="multiple of temporal_num_groups"):
        OpenSoraVAEConfig(temporal_filters=12)
    with pytest.raises(ValueError, match="shift needs latent_channels=4"):
        OpenSoraVAEConfig(shift=(0.0, 0.0))
    with pytest.raises(ValueError, match="scale must be non-zero"):
        OpenSoraVAEConfig(scale=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="micro_frame_size must be a positive int"):
        OpenSoraVAEConfig(micro_frame_size=0)
    with pytest.raises(ValueError, match="spatial_block_out_channels"):
        OpenSoraVAEConfig(spatial_block_out_channels=(8, 12))


@pytest.mark.parametrize("frames,latent", [(1, 1), (4, 1), (5, 2), (16, 4), (17, 5), (20, 6), (34, 10),
                                           (51, 15), (68, 20), (102, 30), (113, 33)])
def test_latent_frames(frames, latent):
    c = OpenSoraVAEConfig()
    assert c.time_factor == 4 and c.spatial_factor == 8 and c.micro_latent_frames == 5
    assert c.latent_frames(frames) == latent


def test_latent_frames_rejects_nonpositive():
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        OpenSoraVAEConfig().latent_frames(0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OpenSoraVAE(TINY).eval()


@pytest.mark.parametrize("frames", [17, 51, 20])
def test_encode_decode_shapes(model, frames):
    x = torch.rand(1, 3, frames, 16, 24) * 2 - 1
    z = model.encode(x, sample=False)
    assert z.shape == (1, 4, model.latent_frames(frames), 2, 3)
    y = model.decode(z, num_frames=frames)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_decode_rejects_a_frame_count_the_latents_do_not_have(model):
    z = torch.randn(1, 4, 5, 2, 2)
    with pytest.raises(ValueError, match="num_frames=21 encodes to 6 latent frames, but z has 5"):
        model.decode(z, num_frames=21)
    model.decode(z[:, :, :2], num_frames=5)  # 5 frames -> 2 latent frames, fine


def test_temporal_vae_pads_in_front_and_crops_the_front():
    torch.manual_seed(0)
    tv = TemporalVAE(TINY).eval()
    with torch.no_grad():
        for frames, latent in [(17, 5), (8, 2), (5, 2), (1, 1)]:
            x = torch.randn(1, 4, frames, 2, 2)
            post = tv.encode(x)
            assert post.mean.shape == (1, 4, latent, 2, 2)
            pad = -frames % 4
            manual = tv.quant_conv(tv.encoder(torch.cat([torch.zeros(1, 4, pad, 2, 2), x], dim=2)))
            torch.testing.assert_close(post.mean, manual[:, :4])
            full = tv.decoder(tv.post_quant_conv(post.mean))  # 4 * latent frames
            assert full.shape[2] == 4 * latent
            torch.testing.assert_close(tv.decode(post.mean, frames), full[:, :, pad:])


def test_logvar_is_clamped():
    moments = torch.cat([torch.zeros(1, 4, 1, 1, 1), torch.full((1, 4, 1, 1, 1), 100.0)], dim=1)
    torch.testing.assert_close(DiagonalGaussian(moments).std, torch.exp(torch.full((1, 4, 1, 1, 1), 10.0)))  # 20 / 2
    moments[:, 4:] = -100.0
    torch.testing.assert_close(DiagonalGaussian(moments).std, torch.exp(torch.full((1, 4, 1, 1, 1), -15.0)))


def test_depth_to_space_time_interleaves_channel_phase_into_time():
    x = torch.arange(2 * 2 * 3, dtype=torch.float32).view(1, 4, 3, 1, 1)  # channels (c, s) = (0,0),(0,1),(1,0),(1,1)
    y = depth_to_space_time(x, 2)
    assert y.shape == (1, 2, 6, 1, 1)
    # output frame 2t + s of channel c is input channel 2c + s at frame t
    for c in range(2):
        for t in range(3):
            for s in range(2):
                assert y[0, c, 2 * t + s, 0, 0] == x[0, 2 * c + s, t, 0, 0]


def changed_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) pair -> (T,) bool: which frames differ anywhere."""
    return (a - b).abs().amax(dim=(0, 1, 3, 4)) > 0


@pytest.mark.parametrize("stride", [1, 2])
def test_causal_conv3d_never_looks_ahead(stride):
    torch.manual_seed(0)
    conv = CausalConv3d(2, 3, 3, time_stride=stride)
    x = torch.randn(1, 2, 8, 3, 3)
    y = conv(x)
    assert y.shape == (1, 3, 8 // stride, 3, 3)
    for i in range(8):
        x2 = x.clone()
        x2[:, :, i] += 1.0
        changed = changed_frames(conv(x2), y)
        first = i if stride == 1 else i // 2  # stride 2: output j sees inputs 2j-1 .. 2j+1
        assert not changed[:first].any(), f"input frame {i} reached output frames before {first}"
        assert changed[first]


def _without_group_norm(tv: TemporalVAE) -> TemporalVAE:
    for module in list(tv.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    return tv


def test_temporal_vae_convolutions_are_causal():
    """With the norms taken out, only the padding rules decide what sees what: a frame reaches
    only its own and later latent frames, and a latent frame only its own and later frames."""
    torch.manual_seed(0)
    tv = _without_group_norm(TemporalVAE(TINY)).eval()
    x = torch.randn(1, 4, 17, 2, 2)
    with torch.no_grad():
        mean = tv.encode(x).mean
        for i, first in [(16, 4), (8, 2), (0, 0)]:  # frame i sits at 3 + i after the front padding
            x2 = x.clone()
            x2[:, :, i] += 1.0
            changed = changed_frames(tv.encode(x2).mean, mean)
            assert not changed[:first].any() and changed[first]

        out = tv.decode(mean, 17)
        z2 = mean.clone()
        z2[:, :, 4] += 1.0  # last latent frame -> padded frames 16..19 -> output frames 13..16
        changed = changed_frames(tv.decode(z2, 17), out)
        assert not changed[:13].any() and changed[13:].all()


def test_group_norm_spans_the_chunk_as_in_the_release():
    """The released VAE is causal in its convolutions only: GroupNorm pools over all frames of a
    chunk, so a later frame moves earlier latents (slightly). Kept as the release has it."""
    torch.manual_seed(0)
    tv = TemporalVAE(TINY).eval()
    x = torch.randn(1, 4, 17, 2, 2)
    x2 = x.clone()
    x2[:, :, 16] += 5.0
    with torch.no_grad():
        assert not torch.equal(tv.encode(x2).mean[:, :, 0], tv.encode(x).mean[:, :, 0])


def test_micro_chunks_never_see_each_other(model):
    x = torch.rand(1, 3, 34, 8, 8) * 2 - 1
    z = model.encode(x, sample=False)
    x2 = x.clone()
    x2[:, :, 30] = -x2[:, :, 30]  # a frame of the second 17-frame chunk
    z2 = model.encode(x2, sample=False)
    assert torch.equal(z[:, :, :5], z2[:, :, :5])
    assert not torch.equal(z[:, :, 5:], z2[:, :, 5:])

    y, y2 = model.decode(z, 34), model.decode(z2, 34)
    assert torch.equal(y[:, :, :17], y2[:, :, :17])


def test_spatial_vae_runs_in_micro_batches_of_four(model, monkeypatch):
    calls = {"encode": [], "decode": []}
    for name in calls:
        original = getattr(model.spatial_vae.module, name)

        def counted(frames, *args, _name=name, _original=original, **kwargs):
            calls[_name].append(frames.shape[0])
            return _original(frames, *args, **kwargs)

        monkeypatch.setattr(model.spatial_vae.module, name, counted)
    x = torch.rand(2, 3, 17, 8, 8) * 2 - 1
    z = model.encode(x, sample=False)
    model.decode(z, 17)
    # (B T) = 34 frames, batch-major, split 4 at a time across the sample boundary
    assert calls["encode"] == calls["decode"] == [4] * 8 + [2]


def test_normalisation_math(model):
    x = torch.rand(1, 3, 17, 8, 8) * 2 - 1
    with torch.no_grad():
        spatial = model.spatial_vae.module.encode(x[0].transpose(0, 1)).latent_dist.mode() * 0.18215
        raw = model.temporal_vae.encode(spatial.transpose(0, 1)[None]).mode()  # (1, 4, 5, 1, 1)
        shift = torch.tensor([-0.10, 0.34, 0.27, 0.98]).view(1, 4, 1, 1, 1)
        scale = torch.tensor([3.85, 2.32, 2.33, 3.06]).view(1, 4, 1, 1, 1)
        z = model.encode(x, sample=False)
        torch.testing.assert_close(z, (raw - shift) / scale)

        x_z = model.temporal_vae.decode(z * scale + shift, 17)  # (1, 4, 17, 1, 1)
        frames = model.spatial_vae.module.decode(x_z[0].transpose(0, 1) / 0.18215).sample
        torch.testing.assert_close(model.decode(z, 17), frames.transpose(0, 1)[None])


def test_sampling_follows_the_generator(model):
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    a = model.encode(x, generator=torch.Generator().manual_seed(1))
    b = model.encode(x, generator=torch.Generator().manual_seed(1))
    c = model.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, model.encode(x, sample=False))


def test_encode_rejects_non_video(model):
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model.encode(torch.zeros(1, 4, 5, 8, 8))


# --------------------------------------------------------------------------- loading


def test_load_round_trip(model, tmp_path):
    sd = model.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    for source in (tmp_path, tmp_path / "model.safetensors"):
        loaded = load_opensora_vae(source, TINY)
        assert not loaded.training
        got = loaded.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)

    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pt")
    loaded = load_opensora_vae(tmp_path / "ckpt.pt", TINY)
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    loaded = load_opensora_vae({f"model.{k}": v for k, v in sd.items()}, TINY)
    x = torch.rand(1, 3, 5, 8, 8) * 2 - 1
    torch.testing.assert_close(loaded.encode(x, sample=False), model.encode(x, sample=False))


def test_config_dict_round_trip_and_the_hub_file():
    assert OpenSoraVAEConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    hub = {"architectures": ["VideoAutoencoderPipeline"], "model_type": "VideoAutoencoderPipeline",
           "freeze_vae_2d": False, "cal_loss": False, "micro_frame_size": 17,
           "shift": [-0.10, 0.34, 0.27, 0.98], "scale": [3.85, 2.32, 2.33, 3.06],
           "vae_2d": {"type": "VideoAutoencoderKL", "micro_batch_size": 4},
           "vae_temporal": {"type": "VAE_Temporal_SD"}}
    assert OpenSoraVAEConfig.from_dict(hub) == OpenSoraVAEConfig()  # unknown keys ignored


def test_a_folder_config_json_is_honoured(model, tmp_path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_opensora_vae(tmp_path)  # no config.json: the release's config
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    assert load_opensora_vae(tmp_path).config == TINY
    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_dict(), "temporal_filters": 6}))  # not a multiple of the 4 groups
    with pytest.raises(ModelError, match="config.json is not a valid Open-Sora VAE config"):
        load_opensora_vae(tmp_path)
    assert load_opensora_vae(tmp_path, TINY).config == TINY  # an explicit config wins


def test_load_errors_name_the_keys(model):
    sd = dict(model.state_dict())
    del sd["temporal_vae.encoder.conv_in.conv.weight"]
    sd["temporal_vae.encoder.extra.weight"] = torch.zeros(1)
    sd["spatial_vae.module.quant_conv.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_opensora_vae(sd, TINY)
    msg = str(err.value)
    assert "missing keys: temporal_vae.encoder.conv_in.conv.weight" in msg
    assert "unexpected keys: temporal_vae.encoder.extra.weight" in msg
    assert "spatial_vae.module.quant_conv.bias (3,) (model (8,))" in msg
    assert isinstance(err.value, ValueError)

    with pytest.raises(CheckpointMismatchError, match="missing keys: .*scale, shift"):
        load_opensora_vae({k: v for k, v in model.state_dict().items() if k not in ("scale", "shift")}, TINY)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        load_opensora_vae(model.state_dict())  # tiny weights into the released config
