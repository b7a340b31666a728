"""The Latte split (stem -> layers -> head) against diffusers' own forward, and each
exported ONNX part against its PyTorch module on fresh inputs.

The reference is ``LatteTransformer3DModel.forward`` loaded from the shipped preset; the
split must reproduce it exactly in fp32 because it is the same ops on the same weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporter.families import get_family

from ..conftest import PRESET

_CFG = json.loads((PRESET / "transformer" / "config.json").read_text())
VL, S, P = _CFG["video_length"], _CFG["sample_size"], _CFG["patch_size"]

# Exact in practice (the split runs the same ops in the same order); the bound only
# leaves room for a future reordering of a reshape-equivalent op.
SPLIT_ATOL = 1e-6
ONNX_RTOL = 1e-4


@pytest.fixture(scope="module")
def model(preset_dir):
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel.from_pretrained(preset_dir, subfolder="transformer").float().eval()


@pytest.fixture(scope="module")
def parts(model):
    return get_family("latte").parts(model)


def random_inputs(model, B, F, H, W, T, seed):
    """Latents, timesteps in the scheduler's range, caption embeddings; independent of the exporter."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, cfg.in_channels, F, H, W, generator=g)
    timestep = torch.rand(B, generator=g) * cfg.num_embeds_ada_norm
    text = torch.randn(B, T, cfg.caption_channels, generator=g)
    return latents, timestep, text


def run_split(parts, latents, timestep, text):
    """Compose the parts the way the manifest's flow says; return the output and the probes."""
    stem, layers, head = parts[0].module, [p.module for p in parts[1:-1]], parts[-1].module
    hidden, temb, embedded_timestep, text_emb = stem(latents, timestep, text)
    probes = []
    for layer in layers:
        spatial, hidden = layer(hidden, temb, text_emb)
        probes.append((spatial, hidden))
    return head(hidden, embedded_timestep), probes


def run_reference(model, latents, timestep, text):
    """diffusers' forward, with each spatial/temporal block's output captured by hooks."""
    captured = {"spatial": [], "temporal": []}
    hooks = [b.register_forward_hook(lambda m, a, out: captured["spatial"].append(out)) for b in model.transformer_blocks]
    hooks += [b.register_forward_hook(lambda m, a, out: captured["temporal"].append(out))
              for b in model.temporal_transformer_blocks]
    try:
        out = model(latents, timestep, text, return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    return out, captured


# (B, F, latent H, latent W, text tokens). diffusers' Latte only runs F == video_length
# when F > 1: it adds the whole temp_pos_embed table without slicing it.
SHAPES = [(2, VL, S, S, 7), (1, VL, S - 2 * P, S + 2 * P, 7)]


@pytest.mark.parametrize("B,F,H,W,T", SHAPES, ids=["B2-square", "B1-non-square"])
def test_split_reproduces_diffusers_forward(model, parts, B, F, H, W, T):
    latents, timestep, text = random_inputs(model, B, F, H, W, T, seed=11)
    with torch.no_grad():
        ref, captured = run_reference(model, latents, timestep, text)
        got, probes = run_split(parts, latents, timestep, text)
    assert got.shape == ref.shape == (B, model.out_channels, F, H, W)
    diff = (got - ref).abs().max().item()
    print(f"split vs diffusers forward at {(B, F, H, W, T)}: max abs diff {diff:.3e}")
    assert diff <= SPLIT_ATOL

    # The probes are what diffusers computes inside its loop: the spatial block output and
    # the temporal block output, only rearranged to (B, F, h, w, D).
    p = model.config.patch_size
    h, w = H // p, W // p
    assert len(probes) == len(captured["spatial"]) == len(captured["temporal"]) == model.config.num_layers
    for i, ((spatial, hidden), ref_s, ref_t) in enumerate(zip(probes, captured["spatial"], captured["temporal"])):
        d = ref_s.shape[-1]
        ref_s = ref_s.reshape(B, F, h, w, d)  # (B*F, N, D) -> (B, F, h, w, D)
        ref_t = ref_t.reshape(B, h, w, F, d).permute(0, 3, 1, 2, 4)  # (B*N, F, D) -> (B, F, h, w, D)
        assert (spatial - ref_s).abs().max().item() <= SPLIT_ATOL, f"layer {i} spatial probe"
        assert (hidden - ref_t).abs().max().item() <= SPLIT_ATOL, f"layer {i} hidden_out probe"


def test_split_runs_fewer_frames_than_video_length(preset_dir, parts):
    """F < video_length: diffusers would fail to broadcast temp_pos_embed; the split slices it.

    The split must equal diffusers' forward on a model whose table is cut to its first F
    rows, i.e. the frames keep the positions they would have in a full-length clip.
    """
    from diffusers import LatteTransformer3DModel

    B, F, H, W, T = 1, VL // 2, S - 2 * P, S + 2 * P, 5
    truncated = LatteTransformer3DModel.from_pretrained(preset_dir, subfolder="transformer").float().eval()
    assert F < truncated.config.video_length
    truncated.temp_pos_embed = truncated.temp_pos_embed[:, :F].clone()
    latents, timestep, text = random_inputs(truncated, B, F, H, W, T, seed=12)
    with torch.no_grad():
        got, probes = run_split(parts, latents, timestep, text)
        ref = truncated(latents, timestep, text, return_dict=False)[0]
    assert got.shape == (B, truncated.out_channels, F, H, W)
    p = truncated.config.patch_size
    assert all(s.shape == hid.shape == (B, F, H // p, W // p, s.shape[-1]) for s, hid in probes)
    diff = (got - ref).abs().max().item()
    print(f"split vs diffusers (temp_pos_embed[:, :{F}]) at F={F}: max abs diff {diff:.3e}")
    assert diff <= SPLIT_ATOL


def test_single_frame_is_outside_the_exported_range_unless_exact(model, parts, preset_dir):
    """Latte skips temp_pos_embed when F == 1 while LatteLayer always adds it, so the split
    differs from diffusers at F == 1; the exported frame range must then start at 2."""
    vae = json.loads((preset_dir / "vae" / "config.json").read_text())
    dims = get_family("latte").dims(model, 2 ** (len(vae["block_out_channels"]) - 1))
    latents, timestep, text = random_inputs(model, 1, 1, S, S, 5, seed=13)
    with torch.no_grad():
        got, _ = run_split(parts, latents, timestep, text)
        ref = model(latents, timestep, text, return_dict=False)[0]
    diff = (got - ref).abs().max().item()
    print(f"split vs diffusers at F=1: max abs diff {diff:.3e}; exported F range starts at {dims['F']['min']}")
    assert diff <= SPLIT_ATOL or dims["F"]["min"] >= 2


# --- exported ONNX parts vs their PyTorch modules -------------------------------------------

# Base dims for the ONNX check: different from the exporter's own validation shapes
# (opt, and opt-1 / w+1), one non-square and one at the top of every range.
ONNX_DIMS = [
    {"B": 1, "F": max(2, VL // 2 + 1), "h": 3, "w": 11, "T": 40},
    {"B": 2, "F": VL, "h": 2 * S // P, "w": 2 * S // P, "T": 120},
]


@pytest.fixture(scope="module")
def manifest(engines_dir):
    return json.loads((engines_dir / "manifest.json").read_text())


def full_dims(manifest, base):
    dims = dict(base)
    for sym, spec in manifest["dims"].items():
        if "of" in spec:
            dims[sym] = dims[spec["of"]] * spec["times"]
        else:
            assert spec["min"] <= dims[sym] <= spec["max"], f"test shape {sym}={dims[sym]} outside {spec}"
    return dims


def fresh_inputs(part, dims, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for spec in part.inputs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        if spec.name == "timestep":
            out.append(torch.rand(shape, generator=g) * 1000.0)
        else:
            out.append(torch.randn(shape, generator=g) * 2.0)
    return tuple(out)


@pytest.mark.parametrize("base", ONNX_DIMS, ids=["small-nonsquare", "max"])
def test_onnx_parts_match_torch_on_fresh_inputs(engines_dir, manifest, parts, base):
    import onnxruntime as ort

    dims = full_dims(manifest, base)
    entries = {e["name"]: e for e in [manifest["parts"]["stem"], *manifest["parts"]["layers"], manifest["parts"]["head"]]}
    assert list(entries) == [p.name for p in parts]
    worst = 0.0
    for k, part in enumerate(parts):
        sess = ort.InferenceSession(str(engines_dir / entries[part.name]["file"]), providers=["CPUExecutionProvider"])
        inputs = fresh_inputs(part, dims, seed=1000 + k)
        with torch.no_grad():
            ref = part.module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run([s.name for s in part.outputs], {s.name: t.numpy() for s, t in zip(part.inputs, inputs)})
        assert len(got) == len(ref) == len(part.outputs)
        for spec, r, g in zip(part.outputs, ref, got):
            want = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
            assert g.shape == tuple(r.shape) == want, f"{part.name}.{spec.name}"
            r = r.numpy()
            scale = float(np.abs(r).max())
            assert scale > 0, f"{part.name}.{spec.name} is all zeros: the comparison would be vacuous"
            rel = float(np.abs(g - r).max()) / scale
            print(f"{base} {part.name}.{spec.name}: max rel err {rel:.2e}")
            assert rel < ONNX_RTOL, f"{part.name}.{spec.name}: ONNX Runtime vs torch rel err {rel:.2e}"
            worst = max(worst, rel)
    print(f"{base}: worst rel err {worst:.2e}")
