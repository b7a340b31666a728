"""tools/serve_load.py against a real foresight-serve: 200 requests from 16 clients, none lost or
duplicated, every video equal to its single-process generation (the cheapest jobs, to bound CI time)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("requests")


def test_200_requests_from_16_clients(engines_dir, tmp_path):
    from tools import serve_load

    out = tmp_path / "load.json"
    code = serve_load.main(["--engines", str(engines_dir), "--requests", "200", "--clients", "16", "--steps", "2",
                            "--frames", "2", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert code == 0, summary
    assert summary["requests"] == summary["completed"] == 200
    assert summary["lost"] == summary["duplicated"] == summary["mismatched"] == 0
    assert 0 < summary["p50_s"] <= summary["p99_s"] and summary["throughput_per_s"] > 0


def test_a_wrong_video_is_counted():
    from tools.serve_load import summarise

    bodies = [{"seed": 0}, {"seed": 1}]
    results = [{"i": 0, "id": "a", "status": "completed", "seconds": 1.0, "video": b"x", "worker": "w"},
               {"i": 1, "id": "a", "status": "failed", "seconds": 2.0, "video": b"", "worker": "w"}]
    s = summarise({"results": results, "wall": 2.0}, {0: b"x", 1: b"y"}, bodies, lambda b: b["seed"])
    assert (s["lost"], s["duplicated"], s["mismatched"], s["completed"]) == (1, 1, 1, 1)
