"""One conformance suite every backend must pass: same part, same inputs, outputs poisoned first."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from runtime.backends import make_backend
from runtime.errors import BackendError
from runtime.manifest import Manifest, load_manifest

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def available(name: str) -> str | None:
    """Why a backend cannot run here, or None."""
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt is not installed (needs an NVIDIA GPU machine)"
        if not torch.cuda.is_available():
            return "no CUDA GPU"
    return None


@pytest.fixture(scope="module")
def reference(engines_dir):
    return make_backend("torch", load_manifest(engines_dir), "cpu")


@pytest.fixture(scope="module")
def dims(engines_dir):
    m = load_manifest(engines_dir)
    d = {s: v["opt"] for s, v in m.data["dims"].items() if "of" not in v}
    d["T"] = 9
    return m.bind_dims(**d)


def random_inputs(part: dict, dims: dict, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for io in part["inputs"]:
        t = torch.randn(Manifest.shape_of(io, dims), generator=g)
        if io["name"] == "timestep":
            t = torch.rand(t.shape, generator=g) * 1000
        out[io["name"]] = t.to(device)
    return out


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "tensorrt"])
def test_backend_conformance(engines_dir, reference, dims, backend):
    reason = available(backend)
    if reason:
        pytest.skip(reason)
    manifest = load_manifest(engines_dir)
    device = "cuda" if backend == "tensorrt" else "cpu"
    engine = make_backend(backend, manifest, device)
    for i, part in enumerate(manifest.all_parts):
        inputs = random_inputs(part, dims, device, seed=i)
        want = {io["name"]: torch.empty(Manifest.shape_of(io, dims)) for io in part["outputs"]}
        reference.run(part["name"], {k: v.cpu() for k, v in inputs.items()}, want)
        got = {io["name"]: torch.full(Manifest.shape_of(io, dims), float("nan"), device=device)
               for io in part["outputs"]}  # poisoned: an output the backend does not write fails
        engine.run(part["name"], inputs, got)
        for name, ref in want.items():
            out = got[name].float().cpu()
            assert torch.isfinite(out).all(), f"{part['name']}.{name} not written"
            rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            assert rel < TOLERANCE[got[name].dtype], f"{backend} {part['name']}.{name}: rel err {rel:.2e}"
    assert engine.calls[manifest.layers[0]["name"]] == 1


def test_unknown_backend(engines_dir):
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        make_backend("nope", load_manifest(engines_dir), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CPU-only message cannot be shown")
def test_tensorrt_without_gpu_or_package_is_a_clear_error(engines_dir):
    with pytest.raises(BackendError, match=r"pip install 'foresight-dit\[tensorrt\]'|no NVIDIA GPU|needs an NVIDIA GPU"):
        make_backend("tensorrt", load_manifest(engines_dir), "cpu")
