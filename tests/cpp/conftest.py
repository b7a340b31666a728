"""The C++ project (cpp/) built once per test session with CMake and Ninja (about 30 s)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CPP = Path(__file__).resolve().parents[2] / "cpp"


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    import nlohmann_json

    build = tmp_path_factory.mktemp("cpp-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(CPP), "-B", str(build), *generator,
                    f"-DNLOHMANN_JSON_INCLUDE_DIR={nlohmann_json.get_include()}"], check=True, capture_output=True)
    done = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return build
