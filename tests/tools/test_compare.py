"""What tools/compare.py adds over the metrics (tested in test_metrics / test_evaluate): per-prompt rows,
aggregation with infinite PSNR, the Pareto front, the table; and smoke runs of the harness itself."""

import json
import math

import numpy as np
import pytest

import tools.compare as cmp
from tools import harness
from tools.evaluate import score_clip
from tools.metrics import SSIM_K1
from tools.synthetic import MOTION, ClipSpec, parse_prompt, render

PROMPT = "a red square moving right on a navy background"


def rendered(prompt: str = PROMPT) -> np.ndarray:
    p = parse_prompt(prompt)
    dx, dy = MOTION[p["direction"]]
    return render(ClipSpec(p["shape"], p["color"], p["direction"], p["background"], size=10.0, speed=1.5,
                           x0=16 - dx * 5.25, y0=16 - dy * 5.25))


# ------------------------------------------------------------------ per prompt and aggregated
def test_quality_row_reads_fidelity_adherence_and_skipped_share():
    clip = rendered()
    assert score_clip(clip, PROMPT)["color_ok"] and score_clip(clip, PROMPT)["direction_ok"]
    same = cmp.quality_row(cmp.Sample(clip, 1.0, 1.0, {"skipped_share": 0.25}), clip, PROMPT, 0, "layers")
    assert math.isinf(same["psnr"]) and same["ssim"] == 1.0
    assert same["color_ok"] and same["direction_ok"] and same["skipped_share"] == 0.25

    counts = {"attn_calls": 40, "attn_skipped": 10, "blocks_calls": 12, "blocks_skipped": 3}
    attn = cmp.quality_row(cmp.Sample(clip, 1.0, 1.0, counts), clip, PROMPT, 0, "attn")
    blocks = cmp.quality_row(cmp.Sample(clip, 1.0, 1.0, counts), clip, PROMPT, 0, "blocks")
    assert attn["skipped_share"] == 0.25 and blocks["skipped_share"] == 0.25 and attn["attn_calls"] == 40


def test_ssim_of_two_flat_frames_is_the_luminance_term():
    # Flat frames have no variance: SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1).
    a, b = np.full((8, 32, 32, 3), 100, np.uint8), np.full((8, 32, 32, 3), 120, np.uint8)
    row = cmp.quality_row(cmp.Sample(a, 1.0, 1.0), b, PROMPT, 0, "layers")
    c1 = (SSIM_K1 * 255) ** 2
    assert row["ssim"] == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-9)
    assert row["psnr"] == pytest.approx(10 * math.log10(255**2 / 20**2))


def test_aggregate_leaves_identical_prompts_out_of_the_mean_psnr():
    rows = [dict(psnr=math.inf, ssim=1.0, color_ok=True, direction_ok=True, skipped_share=0.5),
            dict(psnr=30.0, ssim=0.8, color_ok=True, direction_ok=False, skipped_share=0.25),
            dict(psnr=40.0, ssim=0.9, color_ok=False, direction_ok=False, skipped_share=0.0, uncond_skipped_calls=2,
                 transformer_calls=5)]
    a = cmp.aggregate(rows)
    assert a["psnr"] == 35.0 and a["identical_prompts"] == 1 and a["prompts"] == 3
    assert a["ssim"] == pytest.approx(0.9) and a["skipped_share"] == 0.25
    assert a["color_adherence"] == pytest.approx(200 / 3) and a["both_adherence"] == pytest.approx(100 / 3)
    assert a["uncond_skipped_calls"] == 2 and a["transformer_calls"] == 5
    assert math.isinf(cmp.aggregate(rows[:1])["psnr"])


def test_pareto_front_keeps_only_undominated_points():
    points = {"base": (math.inf, 1.0), "exact-fast": (math.inf, 2.0), "fast": (30.0, 3.0), "slow-bad": (25.0, 2.5),
              "tie-a": (28.0, 3.0), "fastest": (20.0, 4.0)}
    assert cmp.pareto_front(points) == {"exact-fast", "fast", "fastest"}
    assert cmp.pareto_front({"a": (1.0, 1.0), "b": (1.0, 1.0)}) == {"a", "b"}  # equal points dominate neither


# ------------------------------------------------------------------ summary and table
def config(name, method, denoise, psnr, error=None, skipped=0.0):
    c = cmp.Config(name, method, {}, error=error)
    if error is None:
        c.denoise, c.e2e, c.memory = [denoise, denoise], [denoise + 1, denoise + 1], [3.0, None]
        c.rows = [dict(psnr=psnr, ssim=1.0 if math.isinf(psnr) else 0.9, color_ok=True, direction_ok=False,
                       skipped_share=skipped)]
    return c


def table_rows(text: str) -> dict[str, dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return {cells[0]: dict(zip(split[0], cells)) for cells in split[2:]}


def test_summary_and_table():
    why = "failed: RuntimeError: shapes"
    results = cmp.summarize([
        config("diffusers", "diffusers", 2.0, math.inf),
        config("fbc/t0.05", "fbc", 0, 0, error=why), config("fbc/t0.1", "fbc", 0, 0, error=why),
        config("pab/s2", "pab", 1.0, 30.0, skipped=0.2),
        config("onnxruntime/foresight@4", "foresight", 0.5, 35.0, skipped=0.6),
    ])
    by = {r["config"]: r for r in results}
    assert by["diffusers"]["speedup_denoise"] == 1.0 and by["onnxruntime/foresight@4"]["speedup_denoise"] == 4.0
    assert by["pab/s2"]["speedup_e2e"] == 1.5 and by["pab/s2"]["peak_memory_mib"] == 3.0
    assert not by["pab/s2"]["pareto"] and by["onnxruntime/foresight@4"]["pareto"] and by["diffusers"]["pareto"]
    assert by["fbc/t0.1"]["status"] == "failed" and by["fbc/t0.1"]["reason"] == why

    rows = table_rows(cmp.table(results))
    assert set(rows) == {"diffusers", "fbc (t0.05, t0.1)", "pab/s2", "onnxruntime/foresight@4"}
    assert rows["diffusers"]["PSNR dB"] == "inf" and rows["diffusers"]["speedup denoise"] == "1.00x"
    assert rows["fbc (t0.05, t0.1)"]["notes"] == why and rows["fbc (t0.05, t0.1)"]["speedup denoise"] == "-"
    assert rows["onnxruntime/foresight@4"]["skipped"] == "60.0% layers"
    assert rows["pab/s2"]["skipped"] == "20.0% attn" and rows["pab/s2"]["Pareto"] == ""
    assert rows["onnxruntime/foresight@4"]["Pareto"] == "yes" and rows["pab/s2"]["colour %"] == "100"


# ------------------------------------------------------------------ the harness
@pytest.fixture()
def outputs(tmp_path):
    return {"json": tmp_path / "cmp.json", "markdown": tmp_path / "BENCH.md", "plot": tmp_path / "cmp.png"}


def run(engines_dir, outputs, *argv) -> dict:
    files = [a for k, p in outputs.items() for a in (f"--{k}", str(p))]
    # --threads 1: a CI machine shared with other jobs would otherwise make torch's pool spin on busy cores.
    assert cmp.main(["--engines", str(engines_dir), "--repeats", "1", "--prompts", "1", "--threads", "1",
                     *argv, *files]) == 0
    return json.loads(outputs["json"].read_text())


def test_smoke_run_writes_json_markdown_and_plot(engines_dir, outputs, capsys):
    report = run(engines_dir, outputs, "--steps", "2", "--methods", "foresight", "--backends", "onnxruntime",
                 "--thresholds", "4")
    by = {r["config"]: r for r in report["results"]}
    assert set(by) == {"diffusers", "onnxruntime/foresight@4"}  # the baseline is always added
    for r in by.values():
        assert r["status"] == "ok" and r["speedup_denoise"] > 0 and r["speedup_e2e"] > 0
        assert r["denoise_seconds"] > 0 and r["e2e_seconds"] >= r["denoise_seconds"]
        assert 0.0 <= r["skipped_share"] <= 1.0 and len(r["denoise_samples"]) == 1 and len(r["per_prompt"]) == 1
        assert r["peak_memory_mib"] is None or r["peak_memory_mib"] >= 0
    base = by["diffusers"]
    assert base["psnr"] == "inf" and base["ssim"] == 1.0 and base["speedup_denoise"] == 1.0
    assert base["per_prompt"][0]["psnr"] == "inf" and base["identical_prompts"] == 1
    fs = by["onnxruntime/foresight@4"]
    assert fs["params"]["threshold"] == 4.0 and fs["skipped_unit"] == "layers"
    assert fs["psnr"] == "inf" or fs["psnr"] > 40  # 2 steps, within warmup: full compute on ONNX Runtime
    assert report["config"]["steps"] == 2 and report["memory_method"] and report["machine"]["cpu_count"]

    assert "| diffusers |" in capsys.readouterr().out
    md = outputs["markdown"].read_text()
    assert "python -m tools.compare --engines" in md and "| onnxruntime/foresight@4 |" in md
    assert outputs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diffusers_caches_are_wired_or_reported(engines_dir, outputs, monkeypatch):
    # One setting per family keeps it short; 4 steps let TaylorSeer (3 full steps first) predict once.
    for method, settings in cmp.CACHE_SETTINGS.items():
        monkeypatch.setitem(cmp.CACHE_SETTINGS, method, settings[:1])
    report = run(engines_dir, outputs, "--steps", "4", "--methods", "pab,taylorseer,fbc,magcache")
    by = {r["method"]: r for r in report["results"]}
    assert set(by) == {"diffusers", "pab", "taylorseer", "fbc", "magcache"}  # none silently left out
    # PAB reads the timestep StepClock records; TaylorSeer keeps its state in StepClock's cache_context.
    for method in ("pab", "taylorseer"):
        r = by[method]
        assert r["status"] == "ok", r["reason"]
        assert r["skipped_share"] > 0 and r["psnr"] != "inf"  # it skipped attention calls and changed the frames
    for method in ("fbc", "magcache"):  # fail on Latte's interleaved spatial/temporal blocks (diffusers 0.42)
        r = by[method]
        assert r["status"] == "ok" or r["reason"], r


@pytest.mark.parametrize("model", ["cogvideox", "wan"])
def test_cogvideox_and_wan_pipelines_run_the_caches_in_their_own_cache_contexts(request, model, outputs,
                                                                                 monkeypatch):
    # CogVideoXPipeline and WanPipeline open cache_context themselves ("cond_uncond"; "cond" and "uncond" per
    # CFG pass): the clock must not open another, and First Block Cache then runs on their one block stack.
    engines = request.getfixturevalue("aoti_engines_dir" if model == "cogvideox" else "wan_engines_dir")
    for method, settings in cmp.CACHE_SETTINGS.items():
        monkeypatch.setitem(cmp.CACHE_SETTINGS, method, settings[-1:])  # the most aggressive setting
    opened = []
    real = cmp.StepClock.__init__

    def spy(self, open_context=True):
        opened.append(open_context)
        real(self, open_context)

    monkeypatch.setattr(cmp.StepClock, "__init__", spy)
    report = run(engines, outputs, "--steps", "4", "--methods", "fbc,pab,none,hooks", "--backends", "onnxruntime",
                 "--thresholds", "1")
    assert opened == [False]
    by = {r["config"]: r for r in report["results"]}
    assert set(by) == {"diffusers", "fbc/t0.2", "pab/s4-t6-c8", "onnxruntime/none", "diffusers+foresight@1",
                       "diffusers+static"}
    for name in ("fbc/t0.2", "pab/s4-t6-c8", "diffusers+foresight@1", "diffusers+static"):
        assert by[name]["status"] == "ok", by[name]["reason"]
    assert by["onnxruntime/none"]["psnr"] == "inf" or by["onnxruntime/none"]["psnr"] > 40
    assert by["diffusers"]["skipped_unit"] == "blocks"


def test_open_sora_has_no_diffusers_caches_and_says_so():
    runner = object.__new__(harness.OpenSoraReferenceRunner)
    runner.pipe = type("Pipe", (), {"transformer": object()})()
    configs = cmp.cache_configs(cmp.CACHES, runner, 4, cmp.StepClock(False), None, "a prompt", 0)
    assert {c.method for c in configs} == set(cmp.CACHES)
    assert all(c.run is None and "Open-Sora 1.2 has no diffusers pipeline" in c.error for c in configs)
    manifest = type("Manifest", (), {"foresight_defaults": {"warmup": 6, "recalculate": 4, "threshold": 2.0}})()
    hooked = cmp.hooks_configs(runner, manifest, 4, None)
    assert [c.name for c in hooked] == ["diffusers+foresight@1", "diffusers+foresight@2", "diffusers+foresight@4",
                                        "diffusers+static"]
    assert all(c.run is None and "Open-Sora 1.2 has no diffusers pipeline" in c.error for c in hooked)


def test_apply_foresight_rows_equal_the_runtime_torch_rows(engines_dir, outputs):
    # The same Foresight on LattePipeline's eager modules and on the runtime's torch backend: the same frames.
    report = run(engines_dir, outputs, "--steps", "8", "--methods", "hooks,foresight", "--backends", "torch",
                 "--thresholds", "2")
    by = {r["config"]: r for r in report["results"]}
    hooked, runtime = by["diffusers+foresight@2"], by["torch/foresight@2"]
    assert hooked["status"] == "ok" and hooked["skipped_unit"] == "layers" and hooked["skipped_share"] > 0
    assert hooked["skipped_share"] == runtime["skipped_share"] and hooked["psnr"] == runtime["psnr"]
    assert by["diffusers+static"]["status"] == "ok"
    assert "| diffusers+foresight@2 |" in outputs["markdown"].read_text()


def test_bad_arguments_end_with_an_error(capsys):
    assert cmp.main(["--steps", "0"]) == 2
    assert "compare: error: --steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmp.main(["--thresholds", "-1"])
    with pytest.raises(SystemExit):
        cmp.main(["--methods", "teacache"])


def test_in_memory_size_runs_the_torch_backend_only(tmp_path, outputs):
    # The hook for GPU runs (--size latte --device cuda), at tools/gpu_check.py's tiny size on CPU.
    report = run(tmp_path / "unused", outputs, "--size", "tiny", "--steps", "2", "--methods", "none",
                 "--backends", "onnxruntime,torch")
    by = {r["config"]: r for r in report["results"]}
    assert by["onnxruntime/none"]["status"] == "failed" and "torch backend" in by["onnxruntime/none"]["reason"]
    assert by["torch/none"]["status"] == "ok" and by["torch/none"]["psnr"] == "inf"  # same weights, same frames
    assert report["config"]["size"] == "tiny" and report["config"]["engines"] is None
    assert not (tmp_path / "unused").exists()  # nothing exported for an in-memory model
