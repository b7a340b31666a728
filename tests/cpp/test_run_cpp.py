"""foresight-run-cpp (cpp/tools/foresight_run.cpp) against foresight-run on the same engines folder,
prompt and seed: the same frames bit for bit (the Python side with --compiled-components, the text
encoder and VAE decoder the C++ runtime runs), the same decisions, the same mp4 through the same
ffmpeg; and the CLI's refusals, each with a message, a non-zero exit and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import main as run_main
from tests.cpp.test_runtime import without_components

PROMPT = "a red square moving left on a gray background"


@pytest.fixture(scope="module")
def latte_aoti(preset_engines):
    return preset_engines("latte", "tiny", backend="aoti")


@pytest.fixture(scope="module")
def bare_aoti(latte_aoti, tmp_path_factory):
    """The Latte folder without its compiled text encoder and VAE decoder."""
    return without_components(latte_aoti, tmp_path_factory.mktemp("bare") / "engines")


def run_cpp(cpp_build, *args, env=None):
    return subprocess.run([str(cpp_build / "foresight-run-cpp"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_frames_decisions_and_mp4_equal_foresight_run(cpp_build, latte_aoti, tmp_path):
    import imageio_ffmpeg

    py, cpp = tmp_path / "py", tmp_path / "cpp"
    py.mkdir()
    cpp.mkdir()
    common = ["--engines", latte_aoti, "--prompt", PROMPT, "--steps", "10", "--seed", "3", "--warmup", "3"]
    assert run_main([*map(str, common), "--backend", "aoti", "--device", "cpu", "--compiled-components", "--quiet",
                     "--out", str(py / "v.mp4"), "--save-frames", str(py / "f.npy"), "--stats", str(py / "s.json")]) == 0
    done = run_cpp(cpp_build, *common, "--out", cpp / "v.mp4", "--save-frames", cpp / "f.npy", "--stats",
                   cpp / "s.json", "--ffmpeg", imageio_ffmpeg.get_ffmpeg_exe())
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(cpp / "f.npy"), np.load(py / "f.npy"))
    ours, theirs = json.loads((cpp / "s.json").read_text()), json.loads((py / "s.json").read_text())
    assert ours["trace"] == theirs["trace"] and ours["layer_calls_skipped"] == theirs["layer_calls_skipped"] > 0
    assert (cpp / "v.mp4").read_bytes() == (py / "v.mp4").read_bytes()
    assert sorted(p.name for p in cpp.iterdir()) == ["f.npy", "s.json", "v.mp4"]  # no temporaries left
    npy = run_cpp(cpp_build, "--engines", latte_aoti, "--prompt", PROMPT, "--steps", 4, "--policy", "none", "--out",
                  cpp / "none.npy")
    assert npy.returncode == 0, npy.stderr
    assert np.load(cpp / "none.npy").shape == (8, 32, 32, 3)


@pytest.mark.parametrize("args, message, code", [
    (["--prompt", PROMPT, "--out", "o.npy"], "--engines is required", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.npy", "--bogus", "1"], "unknown option --bogus", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.avi"], "unsupported extension .avi for --out", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "{E}/o.npy"], "is inside the engines folder", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "missing/o.npy"], "does not exist; create it first", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.npy", "--steps", "ten"], "--steps takes a whole number", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.npy", "--save-frames", "o.npy"], "name the same file", 2),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.npy", "--steps", "0"], "steps must be a whole number", 1),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.npy", "--height", "30"], "height=30 is not divisible", 1),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.npy", "--policy", "none", "--warmup", "3"], "warmup", 1),
    (["--engines", "{E}", "--prompt", "un caf\u00e9 rouge", "--out", "o.npy"], "non-ASCII characters", 1),
    (["--engines", "nowhere", "--prompt", PROMPT, "--out", "o.npy"], "does not exist", 1),
    (["--engines", "{C}", "--prompt", PROMPT, "--out", "o.npy"], "has no compiled text encoder and VAE decoder", 1),
    (["--engines", "{E}", "--prompt", PROMPT, "--out", "o.mp4"], "writing .mp4 needs an ffmpeg executable", 2),
], ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_bad_input_is_refused_with_nothing_written(cpp_build, latte_aoti, bare_aoti, tmp_path, args, message, code):
    work = tmp_path / "work"
    work.mkdir()
    args = [a.replace("{E}", str(latte_aoti)).replace("{C}", str(bare_aoti)) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "FORESIGHT_FFMPEG"}
    env["PATH"] = "/nonexistent"  # no ffmpeg to find
    done = subprocess.run([str(cpp_build / "foresight-run-cpp"), *args], capture_output=True, text=True, timeout=300,
                          cwd=work, env=env)
    assert done.returncode == code and done.stderr.startswith("foresight-run-cpp: error: ") and message in done.stderr, \
        (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and list(work.iterdir()) == []
    assert not list(latte_aoti.rglob("*.tmp-*"))  # nothing staged in the engines folder either


def test_the_example_host_generates_two_prompts_as_the_cli_does(cpp_build, latte_aoti, tmp_path):
    """cpp/examples/two_prompts.cpp (under 80 lines): one load, two prompts; each video equals
    foresight-run-cpp's for the same prompt, seed and policy."""
    done = subprocess.run([str(cpp_build / "two_prompts"), str(latte_aoti), str(tmp_path / "video")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("layer calls skipped") == 2
    source = Path(__file__).resolve().parents[2] / "cpp" / "examples" / "two_prompts.cpp"
    assert len(source.read_text().splitlines()) < 80
    for i, prompt in enumerate(["a red square moving left on a gray background",
                                "a blue circle moving up on a white background"]):
        ref = tmp_path / f"ref{i}.npy"
        cli = run_cpp(cpp_build, "--engines", latte_aoti, "--prompt", prompt, "--steps", 20, "--seed", 7,
                      "--warmup", 4, "--recalculate", 4, "--threshold", 4.0, "--out", ref)
        assert cli.returncode == 0, cli.stderr
        want = np.load(ref)
        got = np.fromfile(tmp_path / f"video{i}.rgb", dtype=np.uint8).reshape(want.shape)
        assert np.array_equal(got, want)


def test_the_overhead_benchmark_runs_both_runtimes_side_by_side(cpp_build, latte_aoti, tmp_path):
    from tools import cpp_overhead

    report = cpp_overhead.main(["--engines", str(latte_aoti), "--cli", str(cpp_build / "foresight-run-cpp"),
                                "--steps", "3", "--repeats", "1", "--json", str(tmp_path / "o.json")])
    assert {(r["runtime"], r["policy"]) for r in report["rows"]} == {(s, p) for s in ("python", "c++")
                                                                   for p in ("none", "foresight")}
    assert all(r["denoise_seconds"] > 0 and r["cli_seconds"] > r["total_seconds"] for r in report["rows"])
    assert json.loads((tmp_path / "o.json").read_text())["steps"] == 3
