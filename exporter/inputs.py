"""Inputs for tracing and validating parts: the shapes to validate at, random inputs for a
part's I/O specs, and the ``torch.export`` dynamic shapes of the manifest's dims."""

from __future__ import annotations

from runtime.manifest import Dims


def validation_dims(dims_spec: dict) -> list[dict]:
    """Two different shapes inside the built ranges: the opt shape, and a smaller non-square one."""
    dims = Dims.parse(dims_spec)
    second = {s: max(r.min, min(r.max, r.opt - 1 if s != "w" else r.opt + 1)) for s, r in dims.ranges.items()}
    second["B"] = dims.ranges["B"].min
    return [dims.at("opt"), dims.derive(second)]


def max_rel_error(got, want) -> float:
    """max |got - want| / max |want| in float64 (numpy arrays or tensors): how every part is validated."""
    import numpy as np

    got, want = (np.asarray(x.double().cpu() if hasattr(x, "double") else x, dtype=np.float64) for x in (got, want))
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def cast_specs(parts, dtype: str) -> None:
    """Every input and output of ``parts`` in ``dtype``, but the ones the model keeps in their own
    (``fixed_dtype``: timesteps)."""
    for spec in (s for part in parts for s in (*part.inputs, *part.outputs)):
        if not spec.fixed_dtype:
            spec.dtype = dtype


def make_inputs(specs, dims: dict, generator):
    import torch

    tensors = []
    for spec in specs:
        shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
        if spec.low is not None:
            t = torch.rand(shape, generator=generator) * (spec.high - spec.low) + spec.low
        else:
            t = torch.randn(shape, generator=generator)
        tensors.append(t.to(getattr(torch, spec.dtype)))  # drawn in fp32: the same values for every dtype
    return tuple(tensors)


def dynamic_shapes(specs, dims_spec: dict):
    from torch.export import Dim

    syms = {}
    for s, v in dims_spec.items():
        if "of" not in v and v["min"] < v["max"]:  # a symbol of one size is static
            syms[s] = Dim(s, min=v["min"], max=v["max"])
    for s, v in dims_spec.items():
        if "of" in v and v["of"] in syms:  # patch size 1: the same dimension (torch.export refuses 1 * h next to h)
            syms[s] = syms[v["of"]] if v["times"] == 1 else v["times"] * syms[v["of"]]
    return {spec.name: {i: syms[d] for i, d in enumerate(spec.shape) if isinstance(d, str) and d in syms}
            for spec in specs}
