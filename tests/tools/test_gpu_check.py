"""The GPU check script runs end to end at its tiny size on CPU (the same code a GPU run takes,
minus CUDA events and graphs) and writes its report: every configuration the GPU run times,
AOTInductor programs compiled for the CPU, diffusers with torch.compile, and the trained
preset's decisions replayed stretched to the model's depth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import gpu_check

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "latte-foresight.json"  # 6 layers, 12 steps


def test_gpu_check_tiny_on_cpu(tmp_path):
    report = gpu_check.main(["--out", str(tmp_path), "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                             "--steps", "12", "--repeats", "1", "--backends", "torch,aoti", "--replay", str(GOLDEN)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["steps"] == 12 and saved["device"] == "cpu" and saved["aoti_error"] is None
    assert set(saved["denoise_seconds_median"]) == {
        "diffusers", "diffusers+compile", "none", "static", "foresight", "foresight-loose", "replay",
        "aoti none", "aoti foresight", "aoti replay"}
    assert all(v > 0 for v in saved["denoise_seconds_median"].values())
    assert saved["skipped_share"]["none"] == 0 and saved["skipped_share"]["static"] > 0  # W=4: step 5 reuses
    assert saved["skipped_share"]["replay"] == saved["skipped_share"]["aoti replay"] > 0
    layers = [k for k in saved["part_ms"] if k.startswith("layer_")]
    assert len(layers) == len([k for k in saved["aoti_part_ms"] if k.startswith("layer_")]) \
        == gpu_check.SIZES["tiny"]["layers"]
    agreement = saved["latents_rel_err"]
    assert agreement["aoti_none_vs_none"] < 1e-4 and agreement["diffusers+compile_vs_diffusers"] < 1e-4
    assert set(saved["compile_seconds"]) == {"aoti", "diffusers+compile"}
    assert report["cuda_graphs_speedup"] is None
    assert "| aoti replay |" in (tmp_path / "gpu_check.md").read_text()


def test_a_replayed_pattern_is_stretched_to_the_models_depth():
    trace = json.loads(GOLDEN.read_text())
    policy = gpu_check.stretched_replay(GOLDEN, 28, len(trace["steps"]))
    assert policy.num_layers == 28 and len(policy.decisions) == len(trace["steps"])
    for step, (start, measure) in zip(trace["steps"], policy.decisions):
        source = trace["num_layers"] - len(step["computed"])
        assert start == round(source * 28 / trace["num_layers"]) and measure == step["measure"]
        assert (start == 0) == (source == 0) and (start == 28) == (source == trace["num_layers"])
    with pytest.raises(SystemExit, match="pass --steps 12"):
        gpu_check.stretched_replay(GOLDEN, 28, 20)
