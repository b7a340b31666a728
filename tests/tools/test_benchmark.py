"""Smoke run of the benchmark harness on its smallest configuration (timings are not asserted)."""

import json

from tools.benchmark import main


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The printed markdown table as {config: {column header: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, body = split[0], split[2:]
    return {cells[0]: dict(zip(head, cells)) for cells in body}


def test_smoke_run_prints_both_rows_and_writes_json(engines_dir, tmp_path, capsys):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    argv = ["--engines", str(engines_dir), "--steps", "2", "--repeats", "1", "--backends", "onnxruntime",
            "--policies", "none", "--json", str(out_json), "--markdown", str(out_md)]
    assert main(argv) == 0

    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"diffusers", "onnxruntime/none"}
    for row in rows.values():
        assert float(row["denoise s (median)"]) > 0
    assert rows["diffusers"]["speedup"] == "1.00x"
    assert rows["diffusers"]["PSNR vs none (dB)"] == rows["diffusers"]["PSNR vs diffusers (dB)"] == "inf"
    assert rows["onnxruntime/none"]["PSNR vs none (dB)"] == "inf"

    report = json.loads(out_json.read_text())
    assert report["config"]["steps"] == 2 and report["config"]["repeats"] == 1
    assert {"torch", "onnxruntime", "cpu_count", "platform", "torch_num_threads"} <= set(report["machine"])
    by_name = {r["config"]: r for r in report["results"]}
    assert set(by_name) == {"diffusers", "onnxruntime/none"}
    for r in by_name.values():
        assert len(r["samples_seconds"]) == 1 and r["median_seconds"] > 0 and r["deterministic"]
    layers = len(json.loads((engines_dir / "manifest.json").read_text())["parts"]["layers"])
    assert by_name["onnxruntime/none"]["layer_calls"] == 2 * layers  # 2 steps, none skipped
    assert by_name["onnxruntime/none"]["psnr_vs_none"] == "inf"
    assert by_name["onnxruntime/none"]["psnr_vs_diffusers"] == "inf" or \
        by_name["onnxruntime/none"]["psnr_vs_diffusers"] > 60  # same seed: near-identical frames

    assert "| diffusers |" in out_md.read_text()
