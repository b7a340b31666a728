"""The aoti backend: conformance per part, the CogVideoX pipeline oracle, the copy counter, and every
refusal (packages for another torch, device or instruction set; a package in the wrong slot)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from runtime import Runtime
from runtime.backends import make_backend
from runtime.errors import BackendError, ManifestError
from runtime.manifest import load_manifest
from tests.runtime.test_backends import random_inputs
from tests.runtime.test_cogvideox import PROMPT, STEPS, reference
from tests.runtime.test_cli_errors import assert_refused, run_cli


@pytest.fixture(scope="module")
def runtimes(aoti_engines_dir):
    return {b: Runtime.load(aoti_engines_dir, backend=b, device="cpu") for b in ("torch", "aoti")}


@pytest.fixture()
def aoti_copy(aoti_engines_dir, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(aoti_engines_dir, dst)
    return dst


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_every_part_matches_the_torch_reference(aoti_engines_dir):
    manifest = load_manifest(aoti_engines_dir)
    reference_backend = make_backend("torch", manifest, "cpu")
    engine = make_backend("aoti", manifest, "cpu")
    assert engine.loaded == len(manifest.all_parts)
    for dims in ({s: r.opt for s, r in manifest.dims.ranges.items()},
                 {"B": 1, "F": 2, "h": 3, "w": 5, "T": 7}):  # a shape the packages were not validated at
        dims = manifest.dims.bind(**dims)
        for i, part in enumerate(manifest.all_parts):
            inputs = random_inputs(part, dims, "cpu", seed=i)
            want = {io.name: torch.empty(io.shape_at(dims)) for io in part.outputs}
            got = {io.name: torch.full(io.shape_at(dims), float("nan")) for io in part.outputs}  # poisoned
            reference_backend.run(part.name, inputs, want)
            engine.run(part.name, inputs, got)
            for name, ref in want.items():
                rel = float((got[name] - ref).abs().max() / ref.abs().max())
                assert rel < 1e-4, f"{part.name}.{name} at {dims}: {rel:.2e}"


def test_layers_share_one_compiled_program(aoti_engines_dir):
    section = load_manifest(aoti_engines_dir).aoti
    # the parts' three programs, and the compiled text encoder's and VAE decoder's
    assert set(section["programs"]) == {"stem", "layer_000", "head", "components_text_encoder",
                                        "components_vae_decoder"}
    assert {section["parts"][f"layer_{i:03d}"]["program"] for i in range(6)} == {"layer_000"}
    weights = {e["weights"] for e in section["parts"].values()}
    assert len(weights) == 8  # every part its own weights
    for entry in section["parts"].values():
        assert len(entry["validation"]) == 2
        assert max(e for v in entry["validation"] for e in v["max_rel_error"].values()) < 1e-4


def test_aoti_runtime_matches_the_cogvideox_pipeline(runtimes, aoti_engines_dir):
    from exporter.families import get_family

    rt = runtimes["aoti"]
    shapes = rt.manifest.shapes
    latents, video = reference(get_family("cogvideox").presets["tiny"], shapes["frames"]["default"],
                               shapes["height"]["default"], shapes["width"]["default"])
    result = rt.generate(PROMPT, num_inference_steps=STEPS, seed=0, policy="none")
    rel = float((result.latents - latents).abs().max() / latents.abs().max())
    assert rel < 1e-4
    assert np.abs(result.frames.astype(int) - video.astype(int)).max() <= 1


def test_foresight_decisions_equal_the_torch_backends(runtimes):
    runs = {b: rt.generate(PROMPT, num_inference_steps=20, seed=1, policy="foresight", warmup=3, threshold=1.0,
                           decode=False) for b, rt in runtimes.items()}
    computed = {b: [s["computed"] for s in r.trace["steps"]] for b, r in runs.items()}
    assert computed["aoti"] == computed["torch"]
    assert runs["aoti"].stats["layer_calls_skipped"] > 0
    a, t = runs["aoti"].latents, runs["torch"].latents
    assert float((a - t).abs().max() / t.abs().max()) < 1e-4


def test_each_result_is_copied_once_and_counted(runtimes):
    rt = runtimes["aoti"]
    calls = []
    real = rt.backend._call
    rt.backend._call = lambda part, inputs, outputs: (calls.append(sum(t.numel() * t.element_size()
                                                                         for t in outputs.values())),
                                                       real(part, inputs, outputs))
    try:
        result = rt.generate(PROMPT, num_inference_steps=8, seed=0, policy="foresight", warmup=3, threshold=1.0,
                             decode=False)
    finally:
        del rt.backend._call
    assert result.stats["bytes_copied"] == sum(calls) > 0  # exactly the outputs of the parts that ran


def test_packages_built_for_another_torch_are_refused(aoti_copy):
    edit_manifest(aoti_copy, lambda d: d["aoti"].update(torch="2.0.0"))
    with pytest.raises(BackendError, match="built with torch 2.0.0.*re-export with `foresight-export --backend aoti"):
        Runtime.load(aoti_copy, backend="aoti", device="cpu")


def test_packages_for_another_instruction_set_are_refused(aoti_copy):
    edit_manifest(aoti_copy, lambda d: d["aoti"].update(isa="NEON"))
    with pytest.raises(BackendError, match="instruction set NEON"):
        Runtime.load(aoti_copy, backend="aoti", device="cpu")


def test_packages_for_cuda_are_refused_on_cpu(aoti_copy):
    edit_manifest(aoti_copy, lambda d: d["aoti"].update(device="cuda", isa="sm_90"))
    with pytest.raises(BackendError, match="built for cuda, not cpu: run with --device cuda"):
        Runtime.load(aoti_copy, backend="aoti", device="cpu")


def test_a_package_in_the_wrong_slot_is_refused(aoti_copy):
    edit_manifest(aoti_copy, lambda d: d["aoti"]["parts"]["layer_002"].update(program="stem"))
    with pytest.raises(BackendError, match="is not the engine of layer_002"):
        Runtime.load(aoti_copy, backend="aoti", device="cpu")


def test_weights_of_another_part_kind_are_refused(aoti_copy):
    edit_manifest(aoti_copy, lambda d: d["aoti"]["parts"]["head"].update(weights="aoti/layer_000.safetensors"))
    with pytest.raises(BackendError, match="holds other weights than"):
        Runtime.load(aoti_copy, backend="aoti", device="cpu")


def test_a_tampered_package_is_refused_by_its_hash(aoti_copy):
    with open(aoti_copy / "aoti" / "layer_000.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    with pytest.raises(ManifestError, match="layer_000.pt2 does not match the sha256"):
        load_manifest(aoti_copy)


@pytest.mark.parametrize("change, words", [
    (lambda d: d["aoti"].update(dtype="float16"), "aoti.dtype float16 differs"),
    (lambda d: d["aoti"]["parts"].pop("head"), "aoti.parts must list every part"),
    (lambda d: d["aoti"]["parts"]["head"].update(program="nope"), "programs that aoti.programs does not list: nope"),
    (lambda d: d["aoti"].update(device="tpu"), "aoti/device"),
])
def test_inconsistent_aoti_sections_are_refused(aoti_copy, change, words):
    edit_manifest(aoti_copy, change)
    with pytest.raises(ManifestError, match=words):
        load_manifest(aoti_copy)


def test_cli_aoti_on_a_folder_without_packages(engines_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.mp4",
                        "--backend", "aoti", "--device", "cpu")
    assert_refused(code, err, tmp_path, "no AOTInductor packages", "--backend aoti --device cpu")


def test_cli_aoti_packages_for_another_device(aoti_copy, tmp_path, capsys):
    edit_manifest(aoti_copy, lambda d: d["aoti"].update(device="cuda", isa="sm_90"))
    out = tmp_path / "out"
    out.mkdir()
    code, err = run_cli(capsys, "--engines", aoti_copy, "--prompt", PROMPT, "--out", out / "o.mp4",
                        "--backend", "aoti", "--device", "cpu")
    assert_refused(code, err, out, "built for cuda", "--device cuda")


def test_cli_runs_the_aoti_backend(aoti_engines_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "--engines", aoti_engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.mp4",
                        "--backend", "aoti", "--device", "cpu", "--steps", 4, "--stats", tmp_path / "s.json",
                        "--quiet")
    assert code == 0, err
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["backend"] == "aoti" and (tmp_path / "o.mp4").stat().st_size > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (runs on a GPU machine: tools/gpu_checks.sh)")
def test_cuda_packages_match_torch_on_cuda_with_and_without_graphs(tmp_path):
    from exporter.export import ExportOptions, export

    out = export(ExportOptions(model="cogvideox", preset="tiny", out=tmp_path / "e", backend="aoti", device="cuda"),
                 progress=False)
    assert load_manifest(out).aoti["isa"].startswith("sm_")
    with pytest.raises(BackendError, match="built for cuda, not cpu"):
        Runtime.load(out, backend="aoti", device="cpu")
    rts = {"torch": Runtime.load(out, backend="torch", device="cuda"),
           "aoti": Runtime.load(out, backend="aoti", device="cuda"),
           "aoti+graphs": Runtime.load(out, backend="aoti", device="cuda", cuda_graphs=True)}
    runs = {k: rt.generate(PROMPT, num_inference_steps=12, seed=2, policy="foresight", warmup=3, threshold=1.0,
                           decode=False) for k, rt in rts.items()}
    steps = {k: [s["computed"] for s in r.trace["steps"]] for k, r in runs.items()}
    assert steps["aoti"] == steps["torch"] == steps["aoti+graphs"]
    t = runs["torch"].latents
    assert float((runs["aoti"].latents - t).abs().max() / t.abs().max()) < 1e-3  # TF32 convolutions on CUDA
    assert torch.equal(runs["aoti+graphs"].latents, runs["aoti"].latents)  # a replay runs the same kernels
