"""Shared fixtures: one export of the shipped tiny Latte per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

PRESET = Path(__file__).resolve().parent.parent / "exporter" / "presets" / "latte-tiny"


@pytest.fixture(scope="session")
def preset_dir() -> Path:
    return PRESET


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory) -> Path:
    """The tiny preset exported once (about 20 s); tests must not modify it."""
    from exporter.export import ExportOptions, export

    out = tmp_path_factory.mktemp("engines") / "latte-tiny"
    export(ExportOptions(model="latte", preset="tiny", out=out), progress=False)
    return out


@pytest.fixture()
def engines_copy(engines_dir, tmp_path) -> Path:
    """A private copy of the exported folder that a test may corrupt."""
    dst = tmp_path / "engines"
    shutil.copytree(engines_dir, dst)
    return dst


@pytest.fixture(scope="session")
def runtime_ort(engines_dir):
    from runtime import Runtime

    return Runtime.load(engines_dir, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="session")
def runtime_torch(engines_dir):
    from runtime import Runtime

    return Runtime.load(engines_dir, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def aoti_engines_dir(tmp_path_factory) -> Path:
    """The tiny CogVideoX exported by ``foresight-export --backend aoti --device cpu`` (about 90 s:
    ONNX export, then 3 compiled programs for its 8 parts); tests must not modify it."""
    from exporter.cli import main as export_main

    out = tmp_path_factory.mktemp("engines") / "cogvideox-tiny-aoti"
    assert export_main(["--model", "cogvideox", "--preset", "tiny", "--backend", "aoti", "--device", "cpu",
                        "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def preset_engines(tmp_path_factory):
    """``preset_engines(model, preset, backend="onnxruntime")``: that preset's engines folder, exported on first
    use and shared by every test of the session afterwards; tests must not modify it."""
    from exporter.export import ExportOptions, export

    folders: dict[tuple, Path] = {}

    def get(model: str, preset: str, backend: str = "onnxruntime") -> Path:
        key = (model, preset, backend)
        if key not in folders:
            out = tmp_path_factory.mktemp("engines") / f"{model}-{preset}-{backend}"
            export(ExportOptions(model=model, preset=preset, out=out, backend=backend), progress=False)
            folders[key] = out
        return folders[key]

    return get


@pytest.fixture(scope="session")
def wan_engines_dir(preset_engines) -> Path:
    """The random-weight tiny Wan 2.1 (``--model wan --preset tiny-random``)."""
    return preset_engines("wan", "tiny-random")
