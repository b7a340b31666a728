"""The C++ runtime's TensorRT backend (cpp/src/tensorrt.cpp) where it can be exercised without TensorRT:
the refusals of the folder's `tensorrt` section that precede any TensorRT call, as the Python backend
makes them (runtime/backends.py, TensorRTBackend), and the refusal of a library built without TensorRT.

TensorRT is not installable on the machines this project is developed and tested on (its wheels fetch
their libraries from NVIDIA's index, which is not reachable, and there is no GPU): the engine files
written below are placeholders that exist only so the checks that come before TensorRT have a section
to check; tools/gpu_checks.sh lists what a GPU host with TensorRT must run."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tests.cpp.test_run_cpp import PROMPT, run_cpp


@pytest.fixture(scope="module")
def latte_aoti(preset_engines):
    return preset_engines("latte", "tiny", backend="aoti")


def with_tensorrt_section(folder, dest, edit=None):
    """``folder`` copied, with a `tensorrt` section naming one placeholder engine per part, each listed
    in `files` with its hash and recording its part's ONNX hash, as exporter/tensorrt_build.py writes it."""
    shutil.copytree(folder, dest, symlinks=True)
    manifest = json.loads((dest / "manifest.json").read_text())
    parts = [manifest["parts"]["stem"], manifest["parts"]["head"], *manifest["parts"]["layers"]]
    engines = {}
    for part in parts:
        rel = f"{part['name']}.plan"
        data = f"placeholder engine of {part['name']}".encode()
        (dest / rel).write_bytes(data)
        manifest["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        engines[part["name"]] = {"file": rel, "onnx_sha256": manifest["files"][part["file"]]["sha256"],
                                 "tensorrt_version": "10.8.0.43"}
    manifest["tensorrt"] = {"tensorrt_version": "10.8.0.43", "device": {"name": "NVIDIA H100", "compute_capability": "9.0"},
                            "timing_cache": None, "workspace": None, "engines": engines}
    if edit:
        edit(manifest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


def refusal(cpp_build, folder, tmp_path, *flags):
    done = run_cpp(cpp_build, "--engines", folder, "--prompt", PROMPT, "--steps", 2, "--out", tmp_path / "o.npy",
                   "--backend", "tensorrt", *flags)
    assert done.returncode != 0 and done.stderr.startswith("foresight-run-cpp: error: "), (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and not (tmp_path / "o.npy").exists()
    return done.stderr


def test_a_folder_without_engines_or_with_stale_ones_is_refused_as_python_refuses_it(cpp_build, latte_aoti, tmp_path):
    assert "has no TensorRT engines: re-export with `foresight-export --backend tensorrt" in refusal(
        cpp_build, latte_aoti, tmp_path, "--device", "cuda")
    missing = with_tensorrt_section(latte_aoti, tmp_path / "missing", lambda m: m["tensorrt"]["engines"].pop("layer_001"))
    assert "no TensorRT engine for layer_001" in refusal(cpp_build, missing, tmp_path, "--device", "cuda")
    # A re-export without --backend tensorrt carries the section over: engines built from other weights.
    stale = with_tensorrt_section(latte_aoti, tmp_path / "stale",
                                  lambda m: m["tensorrt"]["engines"]["head"].update(onnx_sha256="0" * 64))
    assert "the TensorRT engine of head was built from another head.onnx" in refusal(cpp_build, stale, tmp_path, "--device",
                                                                                     "cuda")


def test_engine_files_are_hashed_and_cuda_is_required(cpp_build, latte_aoti, tmp_path):
    folder = with_tensorrt_section(latte_aoti, tmp_path / "engines")
    assert "the tensorrt backend runs on CUDA only: pass --device cuda" in refusal(cpp_build, folder, tmp_path)
    (folder / "layer_000.plan").write_bytes(b"placeholder engine of layer_00X")  # same size, other bytes
    assert "layer_000.plan does not match the sha256 recorded in the manifest" in refusal(cpp_build, folder, tmp_path,
                                                                                       "--device", "cuda")


def test_a_library_built_without_tensorrt_says_how_to_build_it(cpp_build, latte_aoti, tmp_path):
    configured = (cpp_build / "CMakeCache.txt").read_text()
    assert "TENSORRT_INCLUDE_DIR:PATH=TENSORRT_INCLUDE_DIR-NOTFOUND" in configured  # no TensorRT on this machine
    folder = with_tensorrt_section(latte_aoti, tmp_path / "engines")
    message = refusal(cpp_build, folder, tmp_path, "--device", "cuda")
    assert "built without TensorRT" in message and "-DTENSORRT_ROOT=" in message and "backend aoti" in message


def test_two_expert_folders_and_reduced_precision_are_refused(cpp_build, preset_engines, latte_aoti, tmp_path):
    wan = preset_engines("wan", "tiny-random-a14b", backend="aoti")
    experts = with_tensorrt_section(wan, tmp_path / "wan")
    assert "TensorRT engines are not built for folders with experts yet" in refusal(cpp_build, experts, tmp_path,
                                                                                   "--device", "cuda")
    half = with_tensorrt_section(latte_aoti, tmp_path / "half", lambda m: m.update(dtype="float16"))
    assert "holds float16 engines; the C++ runtime runs float32 ones" in refusal(cpp_build, half, tmp_path, "--device",
                                                                                "cuda")


def test_an_unknown_backend_is_a_usage_error(cpp_build, latte_aoti, tmp_path):
    done = run_cpp(cpp_build, "--engines", latte_aoti, "--prompt", PROMPT, "--out", tmp_path / "o.npy", "--backend", "ort")
    assert done.returncode == 2 and "--backend must be aoti or tensorrt (got ort)" in done.stderr, done.stderr
