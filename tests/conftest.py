"""Shared fixtures: one export of the shipped tiny Latte per test session.

The suite runs on two pytest-xdist workers (``-n 2 --dist loadfile``: a file's tests stay on one
worker, so module fixtures run once). What is expensive to make (engines folders, the C++ build) is
made once per test run for both workers: ``made_once`` builds it under a file lock in a folder the
workers share, and the second worker to ask reuses it (making another export while it waits).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

PRESET = Path(__file__).resolve().parent.parent / "exporter" / "presets" / "latte-tiny"

# Two workers share two cores: a thread that waits for work sleeps instead of spinning (OpenMP's
# default spins), or each worker's idle threads steal the other's core. Results do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shared_root(tmp_path_factory) -> Path:
    """The run's folder that every xdist worker sees (the base temp of a run without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """``shared_root/name`` made by ``make(path)`` once per run, whichever worker asks first; a failed
    make leaves nothing behind, so the next asker tries again and sees the same error. A worker that
    would wait for the other's make makes one of the AOTInductor folders nobody has started instead."""
    root = shared_root(tmp_path_factory)
    lock = _try_lock(root, name)
    while lock is None and _make_another(root, name):
        lock = _try_lock(root, name)
    if lock is None:
        lock = _lock(root, name)
        lock.acquire()
    try:
        return _make(root, name, make)
    finally:
        lock.release()


def _lock(root: Path, name: str):
    from filelock import FileLock

    return FileLock(str(root / f"{name}.lock"))


def _try_lock(root: Path, name: str):
    """``name``'s lock, held, or None when another worker holds it."""
    from filelock import Timeout

    lock = _lock(root, name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _make(root: Path, name: str, make: Callable[[Path], None]) -> Path:
    """``root/name`` made unless a ``.done`` mark says it was, removed again if ``make`` fails; the
    caller holds its lock."""
    path, done = root / name, root / f"{name}.done"
    if not done.exists():
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            make(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        done.touch()
    return path


# The AOTInductor exports the suite shares (about 2 minutes of one core each), largest first.
AOTI_PRESETS = [("cogvideox", "tiny-5b"), ("wan", "tiny-random-a14b"), ("opensora", "tiny"), ("cogvideox", "tiny"),
                ("latte", "tiny")]


def preset_folder(model: str, preset: str, backend: str) -> tuple[str, Callable[[Path], None]]:
    """The shared folder's name for a preset's export, and how to make it."""
    from exporter.export import ExportOptions, export

    return f"engines/{model}-{preset}-{backend}", lambda out: export(
        ExportOptions(model=model, preset=preset, out=out, backend=backend), progress=False)


def _make_another(root: Path, busy: str) -> bool:
    """Make one AOTI_PRESETS folder that no worker has made or started; False if there is none. Its
    failure is left to the test that needs it (which makes it again and reports the error)."""
    for model, preset in AOTI_PRESETS:
        name, make = preset_folder(model, preset, "aoti")
        if name == busy or (root / f"{name}.done").exists() or (lock := _try_lock(root, name)) is None:
            continue
        try:
            _make(root, name, make)
        except Exception:  # noqa: BLE001 - see the docstring
            pass
        finally:
            lock.release()
        return True
    return False


@pytest.fixture(scope="session")
def run_exclusively(tmp_path_factory):
    """``with run_exclusively("ray"): ...`` - no other worker runs a block of the same name meanwhile
    (two Ray clusters on two cores starve each other's replicas)."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    return lambda name: FileLock(str(root / f"{name}.exclusive.lock"))


@pytest.fixture(scope="session")
def preset_dir() -> Path:
    return PRESET


@pytest.fixture(scope="session")
def engines_dir(tmp_path_factory) -> Path:
    """The tiny preset exported once (about 20 s) as ``latte-tiny`` (the server tests' model name);
    tests must not modify it."""
    return made_once(tmp_path_factory, "engines/latte-tiny", preset_folder("latte", "tiny", "onnxruntime")[1])


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
    """The tiny CogVideoX exported with ``backend="aoti"`` (about 2 minutes: ONNX export, then the
    compiled programs of its parts, text encoder and VAE decoder); tests must not modify it."""
    return made_once(tmp_path_factory, *preset_folder("cogvideox", "tiny", "aoti"))


@pytest.fixture(scope="session")
def preset_engines(tmp_path_factory):
    """``preset_engines(model, preset, backend="onnxruntime")``: that preset's engines folder, exported on first
    use and shared by every test of the session afterwards; tests must not modify it."""

    def get(model: str, preset: str, backend: str = "onnxruntime") -> Path:
        return made_once(tmp_path_factory, *preset_folder(model, preset, backend))

    return get


@pytest.fixture(scope="session")
def wan_engines_dir(preset_engines) -> Path:
    """The random-weight tiny Wan 2.1 (``--model wan --preset tiny-random``)."""
    return preset_engines("wan", "tiny-random")
