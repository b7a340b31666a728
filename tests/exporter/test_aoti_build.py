"""foresight-export --backend aoti: grouping of parts into shared programs, example sizes for
tracing, reuse of unchanged programs on re-export, and the refusals before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from exporter.aoti_build import AotiError, build, structure_key, trace_dims
from runtime.manifest import Dims, load_manifest, sha256_file


def test_trace_dims_are_distinct_and_never_one():
    spec = {"B": {"min": 1, "opt": 2, "max": 2}, "F": {"min": 1, "opt": 2, "max": 8},
            "h": {"min": 2, "opt": 8, "max": 16}, "w": {"min": 2, "opt": 8, "max": 16},
            "T": {"min": 1, "opt": 8, "max": 120}, "H": {"of": "h", "times": 2}, "W": {"of": "w", "times": 2}}
    dims = trace_dims(spec)
    free = [dims[s] for s in Dims.parse(spec).ranges]
    assert len(set(free)) == len(free) and min(free) >= 2
    assert dims["H"] == 2 * dims["h"] and dims["B"] == 2
    for s, r in Dims.parse(spec).ranges.items():
        assert r.min <= dims[s] <= r.max


def test_trace_dims_refuses_ranges_without_room():
    spec = {s: {"min": 1, "opt": 2, "max": 2} for s in ("B", "F", "h", "w", "T")}
    with pytest.raises(AotiError, match="no size >= 2 distinct"):
        trace_dims(spec)


def test_structure_keys_group_layers_built_alike(preset_dir):
    from exporter.families import get_family

    family = get_family("latte")
    parts = family.parts(family.load(str(preset_dir)).transformer)
    keys = [structure_key(p.module) for p in parts]
    layers = keys[1:-1]
    assert layers[0] != layers[1]  # Latte's first layer adds the temporal position embedding
    assert len(set(layers[1:])) == 1
    assert len(set(keys)) == 4  # stem, first layer, the other layers, head


def test_reexport_reuses_unchanged_programs(aoti_engines_dir, tmp_path):
    """Building over a folder keeps every program whose key is unchanged (nothing compiled)."""
    import torch

    from exporter.export import pipeline_facts
    from exporter.families import get_family

    family = get_family("cogvideox")
    loaded = family.load(str(family.presets["tiny"]))
    model = loaded.transformer.eval()
    _, pipeline, _ = pipeline_facts(family, model, family.vae_config(loaded), loaded.source)
    dims = family.dims(model, pipeline["vae_scale_factor"], 2, pipeline=pipeline)
    section = build(tmp_path, family.parts(model), dims, "cpu", "float32", previous=aoti_engines_dir,
                    generator=torch.Generator().manual_seed(0), progress=False)
    old = load_manifest(aoti_engines_dir).aoti
    assert {p["built"] for p in section["programs"].values()} == {"reused"}
    for name, entry in section["programs"].items():
        assert entry["key"] == old["programs"][name]["key"]
        assert sha256_file(tmp_path / entry["file"]) == sha256_file(aoti_engines_dir / entry["file"])
    for name, entry in section["parts"].items():  # weights rewritten, equal to the first export's
        assert sha256_file(tmp_path / entry["weights"]) == sha256_file(aoti_engines_dir / entry["weights"])


def test_programs_with_values_compiled_in_are_reused_only_for_those_values(aoti_engines_dir, tmp_path):
    """Inductor compiles some small parameters into the code instead of taking them as constants (the
    CogVideoX head's proj_out.bias): a program keyed by its graph alone would then compute another
    model's head with the old bias. Re-exporting other weights over the folder must recompile it."""
    import torch

    from exporter.aoti_build import baked_digest
    from exporter.export import pipeline_facts
    from exporter.families import get_family
    from runtime.aoti import load_program

    old = load_manifest(aoti_engines_dir).aoti
    head_file = aoti_engines_dir / old["programs"][old["parts"]["head"]["program"]]["file"]
    assert "proj_out.bias" not in load_program(head_file, "cpu").get_constant_fqns()  # what makes it matter

    family = get_family("cogvideox")
    loaded = family.load(str(family.presets["tiny"]))
    model = loaded.transformer.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # other weights: a fine-tune of the same architecture
    _, pipeline, _ = pipeline_facts(family, model, family.vae_config(loaded), loaded.source)
    dims = family.dims(model, pipeline["vae_scale_factor"], 2, pipeline=pipeline)
    parts = family.parts(model)
    section = build(tmp_path, parts, dims, "cpu", "float32", previous=aoti_engines_dir,
                    generator=torch.Generator().manual_seed(0), progress=False)  # validates every part
    built = {name: e["built"] for name, e in section["programs"].items()}
    head = section["parts"]["head"]["program"]
    assert built[head] == "compiled" and section["programs"][head]["baked"] != old["programs"][head]["baked"]
    fqns = set(load_program(tmp_path / section["programs"][head]["file"], "cpu").get_constant_fqns())
    assert section["programs"][head]["baked"] == baked_digest(parts[-1].module, fqns)
    layer = section["parts"]["layer_001"]["program"]  # layers take every tensor as a constant: still shared
    assert built[layer] == "reused" and section["parts"]["layer_004"]["program"] == layer


def test_the_manifest_records_what_the_packages_need(aoti_engines_dir):
    import torch

    data = json.loads((aoti_engines_dir / "manifest.json").read_text())
    section = data["aoti"]
    assert section["torch"] == torch.__version__ and section["device"] == "cpu"
    assert section["isa"] == torch.backends.cpu.get_cpu_capability() and section["dtype"] == data["dtype"]
    listed = set(data["files"])
    assert {e["file"] for e in section["programs"].values()} <= listed
    assert {e["weights"] for e in section["parts"].values()} <= listed


def run_export(tmp_path, *flags, env=None):
    return subprocess.run([sys.executable, "-m", "exporter.cli", "--model", "cogvideox", "--preset", "tiny",
                           "--out", str(tmp_path / "out"), *flags], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_export_without_a_compiler_is_refused_before_any_work(tmp_path):
    proc = run_export(tmp_path, "--backend", "aoti", env={"CXX": str(tmp_path / "no-such-g++"), "PATH": "/nonexistent"})
    assert proc.returncode == 2, proc.stderr
    assert "foresight-export: error: --backend aoti compiles C++: no C++ compiler" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_export_for_cuda_without_a_gpu_is_refused(tmp_path):
    proc = run_export(tmp_path, "--backend", "aoti", "--device", "cuda")
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "--device cpu" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_device_applies_to_aoti_only(tmp_path):
    proc = run_export(tmp_path, "--device", "cuda")
    assert proc.returncode == 2 and "--device applies to --backend aoti" in proc.stderr
