"""The trained small Wan (``foresight-export --model wan --preset tiny``): it exports with the
defaults its training and sweep stored, and its video follows the prompt's colour and direction."""

from __future__ import annotations

import json

import pytest

from exporter.cli import main as export_main


@pytest.fixture(scope="module")
def wan_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("wan-tiny") / "engines"
    assert export_main(["--model", "wan", "--preset", "tiny", "--out", str(out)]) == 0
    return out


def test_the_preset_exports_with_its_trained_defaults(wan_tiny):
    m = json.loads((wan_tiny / "manifest.json").read_text())
    p = m["pipeline"]
    assert p["type"] == "wan" and p["cfg"] == "separate" and len(m["parts"]["layers"]) == 6
    assert (p["default_frames"], p["default_height"], p["default_width"], p["max_text_length"]) == (9, 32, 32, 16)
    assert p["default_guidance"] == 5.0  # WanPipeline's: colour and direction 100% at it (BENCHMARKS.md)
    assert m["foresight_defaults"] == {"warmup": 4, "recalculate": 4, "threshold": 4.0}  # tools/sweep.py's pick


def test_the_video_follows_the_prompt_with_foresight(wan_tiny):
    from runtime import Runtime
    from tools.evaluate import score_clip
    from tools.synthetic import held_out_prompts

    rt = Runtime.load(wan_tiny, backend="onnxruntime", device="cpu")
    prompt = held_out_prompts(1)[0]
    result = rt.generate(prompt, seed=0, policy="foresight")
    score = score_clip(result.frames, prompt)
    assert result.frames.shape == (9, 32, 32, 3)
    assert result.stats["layer_calls_skipped"] > 0
    assert score["color_ok"] and score["direction_ok"], (prompt, score)
