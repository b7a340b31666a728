"""One conformance suite every backend must pass: same part, same inputs, outputs poisoned first."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from runtime.backends import make_backend
from runtime.errors import BackendError
from runtime.manifest import Part, TensorSpec, load_manifest

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def available(name: str, device: str = "cpu") -> str | None:
    """Why a backend cannot run here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU (runs on a GPU machine: tools/gpu_checks.sh)"
    if name == "onnxruntime" and device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (needs onnxruntime-gpu)"
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
    d = {s: r.opt for s, r in m.dims.ranges.items()}
    d["T"] = 9
    return m.dims.bind(**d)


def io_dtype(io: TensorSpec, dtype: torch.dtype) -> torch.dtype:
    return getattr(torch, io.dtype) if io.fixed_dtype else dtype


def random_inputs(part: Part, dims: dict, device, seed: int, dtype: torch.dtype = torch.float32):
    """Random inputs, rounded to ``dtype`` (the reference then sees exactly what the backend sees)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for io in part.inputs:
        t = torch.randn(io.shape_at(dims), generator=g)
        if io.name == "timestep":
            t = torch.rand(t.shape, generator=g) * 1000
        out[io.name] = t.to(io_dtype(io, dtype)).to(device)
    return out


CASES = [  # backend, device, dtype
    ("onnxruntime", "cpu", torch.float32),
    ("torch", "cpu", torch.float32),
    ("onnxruntime", "cuda", torch.float32),
    ("torch", "cuda", torch.float32),
    ("torch", "cuda", torch.bfloat16),
    ("torch", "cuda", torch.float16),
    ("tensorrt", "cuda", torch.float32),
]


@pytest.mark.parametrize("backend,device,dtype", CASES, ids=[f"{b}-{d}-{str(t)[6:]}" for b, d, t in CASES])
def test_backend_conformance(engines_dir, reference, dims, backend, device, dtype):
    reason = available(backend, device)
    if reason:
        pytest.skip(reason)
    manifest = load_manifest(engines_dir)
    engine = make_backend(backend, manifest, device, **({"dtype": dtype} if backend == "torch" else {}))
    assert engine.io_dtype == dtype
    for i, part in enumerate(manifest.all_parts):
        inputs = random_inputs(part, dims, device, seed=i, dtype=dtype)
        want = {io.name: torch.empty(io.shape_at(dims)) for io in part.outputs}
        reference.run(part.name, {k: v.float().cpu() for k, v in inputs.items()}, want)
        got = {io.name: torch.full(io.shape_at(dims), float("nan"), device=device, dtype=io_dtype(io, dtype))
               for io in part.outputs}  # poisoned: an output the backend does not write fails
        engine.run(part.name, inputs, got)
        for name, ref in want.items():
            out = got[name].float().cpu()
            assert torch.isfinite(out).all(), f"{part.name}.{name} not written"
            rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            # cuDNN convolutions (the stem's patch embedding) run in TF32 by default on CUDA, in diffusers too
            tol = 1e-3 if device == "cuda" and dtype == torch.float32 else TOLERANCE[dtype]
            assert rel < tol, f"{backend} {part.name}.{name}: rel err {rel:.2e}"
    assert engine.calls[manifest.layers[0].name] == 1


def test_unknown_backend(engines_dir):
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        make_backend("nope", load_manifest(engines_dir), "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CPU-only message cannot be shown")
def test_tensorrt_without_gpu_or_package_is_a_clear_error(engines_dir):
    with pytest.raises(BackendError, match=r"pip install 'foresight-dit\[tensorrt\]'|no NVIDIA GPU|needs an NVIDIA GPU"):
        make_backend("tensorrt", load_manifest(engines_dir), "cpu")
