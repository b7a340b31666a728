"""Reduced-precision export: every part's ONNX in the export dtype (timesteps stay fp32), validated
against PyTorch in the same dtype, recorded in the manifest, and run by the runtime in that dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.cli import main as export_main
from exporter.export import TOLERANCES, ExportOptions, export
from runtime.manifest import load_manifest

PROMPT = "a red square moving left on a gray background"


@pytest.fixture(scope="module")
def fp16_engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "latte-tiny-fp16"
    export(ExportOptions(model="latte", preset="tiny", out=out, dtype="float16"), progress=False)
    return out


def test_fp16_parts_are_fp16_but_for_the_fixed_inputs(fp16_engines):
    import onnx

    m = load_manifest(fp16_engines)
    assert m.dtype == "float16"
    for part in m.all_parts:
        for t in (*part.inputs, *part.outputs):
            assert t.dtype == ("float32" if t.fixed_dtype else "float16"), (part.name, t.name)
        graph = onnx.load(str(fp16_engines / part.file), load_external_data=False).graph
        types = {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
                 for v in (*graph.input, *graph.output)}
        assert types == {t.name: t.dtype for t in (*part.inputs, *part.outputs)}, part.name
    raw = json.loads((fp16_engines / "manifest.json").read_text())
    assert raw["validation"]["reference"] == "torch eager float16"
    worst = max(e for p in [raw["parts"]["stem"], *raw["parts"]["layers"], raw["parts"]["head"]]
                for v in p["validation"] for e in v["max_rel_error"].values())
    assert 0 < worst <= TOLERANCES["float16"]


def test_fp16_engines_run_close_to_fp32(fp16_engines, runtime_ort):
    from runtime import Runtime

    rt16 = Runtime.load(fp16_engines, backend="onnxruntime", device="cpu")
    import torch

    assert rt16.backend.io_dtype == torch.float16
    kwargs = dict(num_inference_steps=8, seed=0, policy="foresight", warmup=2, recalculate=2)
    a = rt16.generate(PROMPT, **kwargs)
    b = runtime_ort.generate(PROMPT, **kwargs)
    mse = np.mean((a.frames.astype(float) - b.frames.astype(float)) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 40  # measured 62 dB with 50 steps, policy none
    assert a.stats["buffer_bytes"] < b.stats["buffer_bytes"]  # half-size buffers (timesteps stay fp32)


@pytest.fixture(scope="module")
def bf16_engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "latte-tiny-bf16"
    code = export_main(["--model", "latte", "--preset", "tiny", "--dtype", "bfloat16", "--out", str(out)])
    assert code == 0
    return out


def test_bf16_parts_are_validated_on_the_onnx_reference(bf16_engines):
    import onnx

    m = load_manifest(bf16_engines)
    assert m.dtype == "bfloat16"
    for part in m.all_parts:
        graph = onnx.load(str(bf16_engines / part.file), load_external_data=False).graph
        types = {v.name: onnx.helper.tensor_dtype_to_string(v.type.tensor_type.elem_type) for v in graph.input}
        assert {k for k, v in types.items() if v == "TensorProto.BFLOAT16"} == \
            {t.name for t in part.inputs if not t.fixed_dtype}, part.name
    raw = json.loads((bf16_engines / "manifest.json").read_text())
    assert raw["validation"] == {"tolerance": TOLERANCES["bfloat16"], "reference": "torch eager bfloat16",
                                 "runner": "onnx.reference"}
    errors = [e for p in [raw["parts"]["stem"], *raw["parts"]["layers"], raw["parts"]["head"]]
              for v in p["validation"] for e in v["max_rel_error"].values()]
    assert 1e-3 < max(errors) <= TOLERANCES["bfloat16"]  # bf16 rounding shows, within the limit


def test_bf16_engines_run_on_torch_close_to_fp32_and_onnxruntime_refuses_them(bf16_engines, runtime_ort):
    import torch

    from runtime import Runtime
    from runtime.errors import BackendError

    with pytest.raises(BackendError, match="cannot run bfloat16 engines.*--backend torch, aoti or tensorrt"):
        Runtime.load(bf16_engines, backend="onnxruntime", device="cpu")
    rt = Runtime.load(bf16_engines, backend="torch", device="cpu")
    assert rt.backend.io_dtype == torch.bfloat16  # the manifest's dtype unless --dtype says otherwise
    kwargs = dict(num_inference_steps=8, seed=0, policy="none")
    a, b = rt.generate(PROMPT, **kwargs), runtime_ort.generate(PROMPT, **kwargs)
    mse = np.mean((a.frames.astype(float) - b.frames.astype(float)) ** 2)
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 30
