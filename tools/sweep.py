"""Pick a model's Foresight defaults from a small sweep, and picture its per-layer dynamics.

    python -m tools.sweep --engines engines/latte-tiny --json sweep.json --mse-heatmap mse.png

For every (warmup, recalculate, threshold) in the grid it generates the same held-out
prompts with the same seeds as ``none`` and records the share of layer calls skipped, the
PSNR of the frames vs ``none`` and the denoising speedup (summed seconds, the same process).
It also scores every clip with the domain's adherence scorer (``tools/evaluate.py``'s
``score_clip``) and counts the prompts whose colour or direction ``none`` drew right and the
setting drew wrong. The pick is the setting with the most layers skipped that loses no
adherence and keeps a mean PSNR of at least ``--min-psnr`` dB vs ``none`` (ties: higher mean
PSNR); ``--worst-psnr`` additionally asks it of every prompt. (A worst-prompt rule alone can pick
nothing: a prompt whose trajectory sits on a bifurcation ends somewhere else after a single
reused layer call. One of the trained Latte preset's sweep prompts moved its object 24 px instead
of 19 (23 dB) with 1 of its 300 layer calls reused, so no setting kept every prompt at 30 dB.) Separately, a run that measures every layer at every step
(Foresight with recalculate 1: full compute, mse of every probe each step) gives the
per-layer mse heatmap and the spread of the calibrated thresholds across layers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from tools import common
from tools.evaluate import mean_psnr, score_clip
from tools.metrics import psnr
from tools.synthetic import held_out_prompts

ROOT = Path(__file__).resolve().parent.parent


def layer_dynamics(rt, prompt: str, seed: int, steps, warmup: int) -> dict:
    """Full compute with every probe measured every step; thresholds as calibrated at warmup-1."""
    r = rt.generate(prompt, seed=seed, num_inference_steps=steps, policy="foresight", warmup=warmup,
                    recalculate=1, threshold=1.0, decode=False)
    trace = r.trace
    calib = trace["steps"][warmup]["thresholds"]  # thresholds in force after calibration (threshold 1 = raw mse)
    per_layer = [max(row) for row in calib]
    return {"trace": trace, "calibrated_mse": calib, "threshold_spread": max(per_layer) / max(min(per_layer), 1e-30)}


def adherence(frames, prompt: str) -> tuple[bool, bool]:
    score = score_clip(np.asarray(frames), prompt)
    return bool(score["color_ok"]), bool(score["direction_ok"])


def adherence_lost(results, wanted: list[tuple[bool, bool]], prompts) -> int:
    """Prompts whose colour or direction the reference drew right (``wanted``: its ``adherence`` per
    prompt) and ``results`` drew wrong."""
    lost = 0
    for r, want, p in zip(results, wanted, prompts):
        got = adherence(r.frames, p)
        lost += any(w and not g for w, g in zip(want, got))
    return lost


def sweep(rt, prompts, seed, steps, grid, log=print) -> list[dict]:
    refs = [rt.generate(p, seed=seed + i, num_inference_steps=steps, policy="none") for i, p in enumerate(prompts)]
    base_seconds = sum(r.stats["denoise_seconds"] for r in refs)
    wanted = [adherence(ref.frames, p) for ref, p in zip(refs, prompts)]  # scored once, not per setting
    rows = []
    for warmup, recalculate, threshold in grid:
        results = [rt.generate(p, seed=seed + i, num_inference_steps=steps, policy="foresight", warmup=warmup,
                               recalculate=recalculate, threshold=threshold) for i, p in enumerate(prompts)]
        psnrs = [psnr(r.frames, ref.frames) for r, ref in zip(results, refs)]
        row = {
            "warmup": warmup, "recalculate": recalculate, "threshold": threshold,
            "skipped_share": statistics.fmean(r.stats["skipped_share"] for r in results),
            "mean_psnr": mean_psnr(psnrs),
            "min_psnr": min(psnrs),
            "adherence_lost": adherence_lost(results, wanted, prompts),
            "speedup": base_seconds / sum(r.stats["denoise_seconds"] for r in results),
        }
        rows.append(row)
        log(f"W={warmup} R={recalculate} T={threshold}: skipped {100 * row['skipped_share']:.1f}%, "
            f"PSNR {row['mean_psnr']:.2f} dB (min {row['min_psnr']:.2f}), adherence lost on "
            f"{row['adherence_lost']}, speedup {row['speedup']:.2f}x")
    return rows


def pick(rows: list[dict], min_psnr: float, worst_psnr: float | None = None) -> dict | None:
    """Most layers skipped among the settings that lose no adherence, keep mean PSNR >= ``min_psnr``
    and, if given, every prompt's PSNR >= ``worst_psnr``; ties: higher mean PSNR."""
    ok = [r for r in rows if r["adherence_lost"] == 0 and r["mean_psnr"] >= min_psnr
          and (worst_psnr is None or r["min_psnr"] >= worst_psnr)]
    return max(ok, key=lambda r: (r["skipped_share"], r["mean_psnr"])) if ok else None


def main(argv=None) -> dict:
    from runtime import Runtime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, default=ROOT / "engines" / "latte-tiny")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmups", default="4,6,8")
    ap.add_argument("--recalculates", default="2,3,4")
    ap.add_argument("--thresholds", default="0.5,1,2,4")
    ap.add_argument("--min-psnr", type=float, default=30.0, help="mean PSNR vs none the pick must keep (dB)")
    ap.add_argument("--worst-psnr", type=float, default=None,
                    help="PSNR vs none every prompt must keep (dB; default: no per-prompt floor)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--mse-heatmap", type=Path, default=None, help="PNG of per-layer mse at every step")
    ap.add_argument("--write-defaults", type=Path, default=None, metavar="CHECKPOINT",
                    help="store the pick in CHECKPOINT/defaults.json (read by foresight-export)")
    args = ap.parse_args(argv)

    rt = Runtime.load(args.engines, backend=args.backend)
    prompts = held_out_prompts(args.prompts, seed=args.seed)
    grid = list(itertools.product(*[[int(v) for v in args.warmups.split(",")],
                                    [int(v) for v in args.recalculates.split(",")],
                                    [float(v) for v in args.thresholds.split(",")]]))
    dyn = layer_dynamics(rt, prompts[0], args.seed, args.steps, warmup=min(int(v) for v in args.warmups.split(",")))
    print(f"calibrated per-layer change spreads {dyn['threshold_spread']:.1f}x across layers", file=sys.stderr)
    if args.mse_heatmap:
        from runtime.heatmap import plot_reuse_heatmap

        plot_reuse_heatmap(dyn["trace"], args.mse_heatmap, title="Per-layer mse vs previous step (full compute)")
    rows = sweep(rt, prompts, args.seed, args.steps, grid, log=lambda m: print(m, file=sys.stderr))
    best = pick(rows, args.min_psnr, args.worst_psnr)
    report = {"command": common.command_line("sweep", argv),
              "prompts": prompts, "rows": rows, "pick": best, "min_psnr": args.min_psnr,
              "worst_psnr": args.worst_psnr,
              "threshold_spread": dyn["threshold_spread"], "calibrated_mse": dyn["calibrated_mse"]}
    head = ["warmup", "recalculate", "threshold", "skipped", "mean PSNR dB", "min PSNR dB", "adherence lost", "speedup"]
    print(common.markdown_table(head, [[
        str(r["warmup"]), str(r["recalculate"]), str(r["threshold"]), f"{100 * r['skipped_share']:.1f}%",
        f"{r['mean_psnr']:.2f}", f"{r['min_psnr']:.2f}", str(r["adherence_lost"]),
        f"{r['speedup']:.2f}x" + (" **pick**" if r is best else ""),
    ] for r in rows], ["---:"] * len(head)))
    print(f"pick: {json.dumps({k: best[k] for k in ('warmup', 'recalculate', 'threshold')}) if best else None}")
    if args.json:
        common.write_json(report, args.json, default=str)
    if args.write_defaults and best:
        path = args.write_defaults / "defaults.json"
        defaults = json.loads(path.read_text()) if path.is_file() else {}
        defaults["foresight"] = {k: best[k] for k in ("warmup", "recalculate", "threshold")}
        common.write_json(defaults, path)
        print(f"wrote {path}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
