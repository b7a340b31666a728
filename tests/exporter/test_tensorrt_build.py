"""The TensorRT build path's pure parts, and clear messages where tensorrt or a GPU is missing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from exporter.tensorrt_build import needs_rebuild, profile_shapes, write_manifest_section
from runtime.errors import BackendError
from runtime.manifest import load_manifest, sha256_file
from runtime.trt import check_runtime_compat, require_tensorrt

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profiles_cover_the_manifest_ranges(engines_dir):
    m = load_manifest(engines_dir)
    dims = m.dims.ranges
    shapes = profile_shapes(m.stem, m.dims)
    lo, opt, hi = shapes["latents"]
    assert m.dims.derived["H"][0] == "h"
    p = m.dims.derived["H"][1]
    assert lo == (dims["B"].min, m.stem.inputs[0].shape[1], dims["F"].min, dims["h"].min * p, dims["w"].min * p)
    assert hi[0] == 2 and hi[2] == dims["F"].max and hi[3] == dims["h"].max * p
    assert opt[0] == 2  # classifier-free guidance doubles the batch: the common case is the optimum
    layer = profile_shapes(m.layers[0], m.dims)
    assert set(layer) == set(m.layers[0].input_names)
    for lo, opt, hi in layer.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_rebuild_only_what_changed(tmp_path):
    engine = tmp_path / "layer_000.plan"
    engine.write_bytes(b"plan")
    device = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    profile = {"hidden": [[1, 2], [2, 2], [2, 4]]}
    recorded = {"sha256": sha256_file(engine), "onnx_sha256": "abc", "tensorrt_version": "11.4.0",
                "device": device, "profile": profile}
    assert needs_rebuild(recorded, "abc", "11.4.0", device, profile, engine) is None
    assert needs_rebuild(recorded, "abd", "11.4.0", device, profile, engine) == "onnx_sha256 changed"
    assert needs_rebuild(recorded, "abc", "11.5.0", device, profile, engine) == "tensorrt_version changed"
    other = {"name": "NVIDIA L4", "compute_capability": "8.9"}
    assert needs_rebuild(recorded, "abc", "11.4.0", other, profile, engine) == "device changed"
    assert needs_rebuild(recorded, "abc", "11.4.0", device, {"hidden": [[1, 2], [2, 2], [2, 8]]}, engine) \
        == "profile changed"
    assert needs_rebuild(None, "abc", "11.4.0", device, profile, engine) == "no engine yet"
    engine.write_bytes(b"other")
    assert needs_rebuild(recorded, "abc", "11.4.0", device, profile, engine) == "engine file changed on disk"


def test_runtime_refuses_engines_from_another_tensorrt_or_gpu(tmp_path):
    section = {"tensorrt_version": "11.4.0", "device": {"name": "NVIDIA H100", "compute_capability": "9.0"}}
    check_runtime_compat(section, "11.4.0", {"name": "NVIDIA H100 PCIe", "compute_capability": "9.0"}, tmp_path)
    with pytest.raises(BackendError, match=r"TensorRT 11.4.0, this is 11.5.0: re-export"):
        check_runtime_compat(section, "11.5.0", section["device"], tmp_path)
    with pytest.raises(BackendError, match=r"compute capability 9.0, this GPU is 8.9 .*re-export"):
        check_runtime_compat(section, "11.4.0", {"name": "L4", "compute_capability": "8.9"}, tmp_path)
    with pytest.raises(BackendError, match=r"no TensorRT engines: re-export"):
        check_runtime_compat(None, "11.4.0", section["device"], tmp_path)


def test_manifest_section_is_replaced_atomically(engines_copy):
    write_manifest_section(engines_copy, "tensorrt", {"engines": {}})
    data = json.loads((engines_copy / "manifest.json").read_text())
    assert data["tensorrt"] == {"engines": {}}
    assert load_manifest(engines_copy).num_layers == len(data["parts"]["layers"])
    assert not list(engines_copy.glob(".manifest.*"))


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: the missing-package message cannot be shown")
def test_missing_tensorrt_says_what_to_install(capsys):
    with pytest.raises(BackendError, match=r"pip install 'foresight-dit\[tensorrt\]'"):
        require_tensorrt()
    from exporter.cli import main

    assert main(["--model", "latte", "--preset", "tiny", "--backend", "tensorrt", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "Traceback" not in err


@pytest.mark.skipif(not HAVE_TRT, reason="tensorrt is not installed (it needs an NVIDIA GPU machine)")
def test_every_tensorrt_api_name_the_backend_uses_exists():
    import tensorrt as trt

    from runtime.backends import TensorRTBackend

    for dotted in TensorRTBackend.TRT_API:
        obj = trt
        for part in dotted.split("."):
            assert hasattr(obj, part), dotted
            obj = getattr(obj, part)


def test_reexport_carries_engines_so_only_changes_rebuild(engines_copy, tmp_path):
    """A re-export over a folder with TensorRT engines keeps the plans, the timing cache and
    the manifest section; unchanged ONNX files then need no rebuild."""
    from exporter.export import carry_engines

    m = json.loads((engines_copy / "manifest.json").read_text())
    device = {"name": "NVIDIA H100", "compute_capability": "9.0"}
    engines = {}
    for part in [m["parts"]["stem"], *m["parts"]["layers"], m["parts"]["head"]]:
        plan = engines_copy / part["file"].replace(".onnx", ".plan")
        plan.write_bytes(part["name"].encode())
        engines[part["name"]] = {"file": plan.name, "sha256": sha256_file(plan),
                                 "onnx_sha256": m["files"][part["file"]]["sha256"],
                                 "tensorrt_version": "11.4.0", "device": device, "profile": {}}
    (engines_copy / "timing.cache").write_bytes(b"cache")
    write_manifest_section(engines_copy, "tensorrt", {"tensorrt_version": "11.4.0", "device": device,
                                                      "timing_cache": "timing.cache", "engines": engines})
    new = tmp_path / "new"
    new.mkdir()
    fresh = {"parts": m["parts"]}
    carry_engines(engines_copy, new, fresh)
    assert fresh["tensorrt"]["engines"] == engines
    assert (new / "timing.cache").read_bytes() == b"cache"
    for name, entry in engines.items():
        part = next(p for p in [m["parts"]["stem"], *m["parts"]["layers"], m["parts"]["head"]] if p["name"] == name)
        onnx_sha256 = m["files"][part["file"]]["sha256"]
        assert needs_rebuild(entry, onnx_sha256, "11.4.0", device, {}, new / entry["file"]) is None
    # A folder without engines carries nothing.
    plain = {"parts": m["parts"]}
    carry_engines(tmp_path / "missing", new, plain)
    assert "tensorrt" not in plain
