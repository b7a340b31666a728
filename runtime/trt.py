"""What the runtime needs of TensorRT: the import with a clear message, and the refusal of
engines built by another TensorRT version or for another GPU. The builder that writes the
engines lives in the exporter (``exporter.tensorrt_build``)."""

from __future__ import annotations

from pathlib import Path

from .errors import BackendError


def require_tensorrt():
    """Import tensorrt and check for a CUDA GPU, or say exactly what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            "TensorRT is not installed: on a machine with an NVIDIA GPU run "
            "pip install 'foresight-dit[tensorrt]' (tensorrt and polygraphy), then re-run with --backend tensorrt; "
            "without a GPU use --backend onnxruntime"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendError("TensorRT engines need an NVIDIA GPU and none is visible here: use --backend onnxruntime")
    return trt


def device_identity() -> dict:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def check_runtime_compat(section: dict | None, trt_version: str, device: dict, folder: Path) -> None:
    """The runtime refuses engines built by another TensorRT or for another GPU."""
    fix = f"re-export with `foresight-export --backend tensorrt --out {folder} --overwrite` on this machine"
    if not section:
        raise BackendError(f"{folder} has no TensorRT engines: {fix}")
    if section.get("tensorrt_version") != trt_version:
        raise BackendError(f"engines in {folder} were built with TensorRT {section.get('tensorrt_version')}, "
                           f"this is {trt_version}: {fix}")
    if section.get("device", {}).get("compute_capability") != device["compute_capability"]:
        raise BackendError(f"engines in {folder} were built for compute capability "
                           f"{section.get('device', {}).get('compute_capability')}, this GPU is "
                           f"{device['compute_capability']} ({device['name']}): {fix}")
