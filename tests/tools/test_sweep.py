"""tools/sweep.py: the pick rule on known rows, adherence loss on clips with a known answer, and a
small sweep on the shipped preset's engines."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np

from tools import sweep
from tools.synthetic import ClipSpec, render


def row(warmup, skipped, mean, worst, lost=0):
    return {"warmup": warmup, "recalculate": 2, "threshold": 1.0, "skipped_share": skipped, "mean_psnr": mean,
            "min_psnr": worst, "adherence_lost": lost, "speedup": 1.0}


def test_pick_most_skipped_that_keeps_adherence_and_mean_psnr():
    rows = [row(4, 0.30, 40.0, 35.0), row(6, 0.50, 36.0, 22.0), row(8, 0.60, 38.0, 33.0, lost=1),
            row(10, 0.70, 29.0, 25.0)]
    assert sweep.pick(rows, 30.0)["warmup"] == 6  # 8 loses adherence, 10 is below 30 dB on average
    assert sweep.pick(rows, 30.0, worst_psnr=30.0)["warmup"] == 4  # 6's worst prompt is at 22 dB
    assert sweep.pick(rows, 45.0) is None
    tie = [row(4, 0.5, 35.0, 30.0), row(6, 0.5, 37.0, 30.0)]
    assert sweep.pick(tie, 30.0)["warmup"] == 6


def clip(prompt_spec: ClipSpec) -> SimpleNamespace:
    return SimpleNamespace(frames=render(prompt_spec))


def test_adherence_lost_counts_prompts_none_drew_right_and_the_setting_drew_wrong():
    right = ClipSpec("square", "red", "left", "gray", size=10.0, speed=1.5, x0=22.0, y0=16.0)
    wrong_colour = dataclasses.replace(right, color="blue")
    wrong_way = dataclasses.replace(right, direction="right", x0=10.0)
    prompt = right.prompt
    assert sweep.adherence(render(right), prompt) == (True, True)
    assert sweep.adherence(render(wrong_colour), prompt) == (False, True)
    assert sweep.adherence(render(wrong_way), prompt) == (True, False)
    refs = [clip(right), clip(right), clip(right), clip(wrong_colour)]
    results = [clip(right), clip(wrong_colour), clip(wrong_way), clip(wrong_colour)]
    # prompt 1 loses colour, prompt 2 direction; prompt 3 was already wrong under none: not a loss
    wanted = [sweep.adherence(r.frames, prompt) for r in refs]
    assert sweep.adherence_lost(results, wanted, [prompt] * 4) == 2
    assert sweep.adherence_lost(refs, wanted, [prompt] * 4) == 0


def test_sweep_on_the_preset_writes_rows_pick_and_defaults(engines_copy, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "defaults.json").write_text(json.dumps({"guidance_scale": 2.0}))
    # threshold 0 never reuses (frames identical to none: always eligible), 1000 reuses whatever it may
    report = sweep.main(["--engines", str(engines_copy), "--prompts", "2", "--steps", "12", "--warmups", "3",
                         "--recalculates", "2", "--thresholds", "0,1000", "--json", str(tmp_path / "s.json"),
                         "--write-defaults", str(checkpoint)])
    rows = report["rows"]
    assert [r["threshold"] for r in rows] == [0.0, 1000.0]
    assert rows[0]["skipped_share"] == 0 and rows[0]["min_psnr"] == float("inf") and rows[0]["adherence_lost"] == 0
    assert rows[1]["skipped_share"] > 0.3 and rows[1]["adherence_lost"] in (0, 1, 2)
    assert report["pick"] == sweep.pick(rows, 30.0) and report["pick"] is not None
    assert json.loads((tmp_path / "s.json").read_text())["pick"] == json.loads(json.dumps(report["pick"]))
    defaults = json.loads((checkpoint / "defaults.json").read_text())
    assert defaults["guidance_scale"] == 2.0  # kept
    assert defaults["foresight"] == {k: report["pick"][k] for k in ("warmup", "recalculate", "threshold")}
    assert np.isfinite(report["threshold_spread"]) and report["threshold_spread"] >= 1
