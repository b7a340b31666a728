"""The C++ project (cpp/) built once per test session with CMake and Ninja: the controller library and,
on libtorch from the torch wheel, the runtime (about 2 minutes on 2 cores)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import made_once

CPP = Path(__file__).resolve().parents[2] / "cpp"


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    import nlohmann_json
    import torch

    def make(build: Path) -> None:
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), *generator,
                                    f"-DNLOHMANN_JSON_INCLUDE_DIR={nlohmann_json.get_include()}",
                                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                                   capture_output=True, text=True)
        assert configure.returncode == 0, configure.stdout[-4000:] + configure.stderr[-4000:]
        assert "building the libtorch runtime" in configure.stdout, configure.stdout[-2000:]
        done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    return made_once(tmp_path_factory, "cpp-build", make)
