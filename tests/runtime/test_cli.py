"""foresight-run end to end, and every bad input: clear message, exit 2, no traceback, no file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from runtime.cli import main

PROMPT = "a red square moving left on a black background"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture(scope="module")
def shapes(engines_dir):
    return json.loads((engines_dir / "manifest.json").read_text())["shapes"]


def test_end_to_end_writes_video_heatmap_stats_frames(engines_dir, shapes, tmp_path, capsys):
    out, heat, stats, npy = (tmp_path / n for n in ("out.mp4", "reuse.png", "stats.json", "frames.npy"))
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", out, "--steps", 12,
                        "--policy", "foresight", "--warmup", 4, "--threshold", 20,
                        "--heatmap", heat, "--stats", stats, "--save-frames", npy)
    assert code == 0, err
    frames = np.load(npy)
    F, H, W = shapes["frames"]["default"], shapes["height"]["default"], shapes["width"]["default"]
    assert frames.shape == (F, H, W, 3) and frames.dtype == np.uint8
    video = iio.imread(out)
    assert video.shape[0] == F and video.shape[1:3] == (H, W)
    # H.264 with 4:2:0 chroma is lossy on tiny frames: the video must still be far closer
    # to its own frames than to the same frames one step out of order.
    same = np.abs(video.astype(int) - frames.astype(int)).mean()
    shifted = np.abs(video.astype(int) - np.roll(frames, 1, axis=0).astype(int)).mean()
    assert same < 0.6 * shifted
    assert iio.imread(heat).ndim == 3
    data = json.loads(stats.read_text())
    for key in ("policy", "backend", "steps", "num_layers", "layer_calls", "layer_calls_skipped",
                "denoise_seconds", "total_seconds", "trace"):
        assert key in data
    L = len(json.loads((engines_dir / "manifest.json").read_text())["parts"]["layers"])
    assert data["policy"] == "foresight" and data["steps"] == 12 and data["num_layers"] == L
    assert data["layer_calls"] + data["layer_calls_skipped"] == 12 * L
    assert len(data["trace"]["steps"]) == 12
    assert "skipped" in err and "denoise" in err and "decode" in err


def test_gif_output_and_torch_backend(engines_dir, shapes, tmp_path, capsys):
    out = tmp_path / "out.gif"
    m = shapes["height"]["multiple_of"]
    h, w = shapes["height"]["default"] - 2 * m, shapes["width"]["default"] + 2 * m
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", out, "--steps", 3,
                        "--backend", "torch", "--policy", "none", "--frames", shapes["frames"]["max"] // 2,
                        "--height", h, "--width", w, "--quiet")
    assert code == 0, err
    assert iio.imread(out).shape[1:3] == (h, w)


def corrupt(folder: Path, how: str) -> None:
    m = folder / "manifest.json"
    data = json.loads(m.read_text())
    if how == "json":
        m.write_text("{ not json")
    elif how == "fields":
        del data["parts"]
        m.write_text(json.dumps(data))
    elif how == "schema":
        data["schema_version"] = 99
        m.write_text(json.dumps(data))
    elif how == "hash":
        layer = folder / data["parts"]["layers"][1]["file"]
        layer.write_bytes(layer.read_bytes()[:-10] + b"0123456789")
    elif how == "missing-file":
        (folder / data["parts"]["layers"][2]["file"]).unlink()


@pytest.mark.parametrize("how, message", [
    ("json", r"is not valid JSON.*re-export"),
    ("fields", r"does not follow the engines format at \(top level\): 'parts' is a required property.*re-export"),
    ("schema", r"schema version 99, newer than this runtime's 3: upgrade"),
    ("hash", r"layer_001.onnx does not match the sha256.*re-export"),
    ("missing-file", r"layer_002.onnx listed in the manifest is missing"),
])
def test_bad_engines_folder(engines_copy, tmp_path, capsys, how, message):
    corrupt(engines_copy, how)
    out = tmp_path / "out.mp4"
    code, err = run_cli(capsys, "--engines", engines_copy, "--prompt", PROMPT, "--out", out, "--steps", 2)
    assert code == 2
    assert err.startswith("foresight-run: error: ")
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_missing_engines_folder(tmp_path, capsys):
    code, err = run_cli(capsys, "--engines", tmp_path / "nope", "--prompt", PROMPT, "--out", tmp_path / "o.mp4")
    assert code == 2 and "does not exist: build it with `foresight-export" in err


BAD_ARGS = {
    "frames": lambda sh: (("--frames", sh["frames"]["max"] + 24),
                          rf"frames={sh['frames']['max'] + 24} is outside the exported range "
                          rf"\[{sh['frames']['min']}, {sh['frames']['max']}\]"),
    "height": lambda sh: (("--height", sh["height"]["default"] + 2),
                          rf"height={sh['height']['default'] + 2} is not divisible by {sh['height']['multiple_of']} "
                          rf".*pass --height {sh['height']['default']} or "
                          rf"{sh['height']['default'] + sh['height']['multiple_of']}"),
    "width": lambda sh: (("--width", sh["width"]["max"] * 2), rf"width={sh['width']['max'] * 2} is outside"),
    "warmup": lambda sh: (("--warmup", 1), r"warmup must be >= 2"),
    "threshold": lambda sh: (("--threshold", -1), r"threshold"),
    "recalculate": lambda sh: (("--recalculate", 0), r"recalculate"),
    "policy-option": lambda sh: (("--policy", "none", "--threshold", 0.5),
                                 r"--threshold do\(es\) not apply to --policy none"),
    "static": lambda sh: (("--policy", "static", "--reuse", 2, "--period", 2), r"reuse"),
    "steps": lambda sh: (("--steps", 0), r"steps must be a whole number in 1\.\.\d+ .*got 0\).*--steps"),
    "cuda-graphs-ort": lambda sh: (("--cuda-graphs",), r"--cuda-graphs applies to --backend torch, aoti or tensorrt"),
    "cuda-graphs-cpu": lambda sh: (("--cuda-graphs", "--backend", "torch", "--device", "cpu"),
                                   r"CUDA graphs need --device cuda"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_generation_arguments(engines_dir, shapes, tmp_path, capsys, case):
    args, message = BAD_ARGS[case](shapes)
    out = tmp_path / "out.mp4"
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", out, "--steps", 2, *args)
    assert code == 2, err
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("target, message", [
    ("missing/out.mp4", r"does not exist"),
    ("file.txt/out.mp4", r"not a folder|does not exist|not writable"),
    ("out.avi", r"\.mp4"),
])
def test_bad_output_path(engines_dir, tmp_path, capsys, target, message):
    (tmp_path / "file.txt").write_text("x")
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / target)
    assert code == 2
    assert __import__("re").search(message, err), err


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "--engines", str(tmp_path / "missing"), "--prompt", "x",
         "--out", str(tmp_path / "o.mp4")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "foresight-run: error:" in proc.stderr
