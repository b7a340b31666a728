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


def test_bfloat16_export_is_refused_with_the_reason(tmp_path, capsys):
    code = export_main(["--model", "latte", "--preset", "tiny", "--dtype", "bfloat16", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "bfloat16" in err and "bf16 kernels" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
