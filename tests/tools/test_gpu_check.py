"""The GPU check script runs end to end at its tiny size on CPU (the same code a GPU run takes,
minus CUDA events and graphs) and writes its report."""

from __future__ import annotations

import json

from tools import gpu_check


def test_gpu_check_tiny_on_cpu(tmp_path):
    report = gpu_check.main(["--out", str(tmp_path), "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                             "--steps", "6", "--repeats", "1"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["steps"] == 6 and saved["device"] == "cpu"
    assert set(saved["denoise_seconds_median"]) == {"diffusers", "none", "static", "foresight", "foresight-loose"}
    assert all(v > 0 for v in saved["denoise_seconds_median"].values())
    assert saved["skipped_share"]["none"] == 0 and saved["skipped_share"]["static"] > 0  # W=4: step 5 reuses
    layers = [k for k in saved["part_ms"] if k.startswith("layer_")]
    assert len(layers) == gpu_check.SIZES["tiny"]["layers"]
    assert report["cuda_graphs_speedup"] is None
    assert "| diffusers |" in (tmp_path / "gpu_check.md").read_text()
