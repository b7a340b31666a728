"""Prompt adherence and fidelity of a model trained on the synthetic domain (tools/synthetic.py).

    python -m tools.evaluate --engines engines/latte-synth --prompts 32 --policies none,static,foresight \\
        --json /tmp/eval.json

Every prompt is generated with every policy from the same seed (``seed + i`` for prompt i),
one prompt at a time, the policies back to back in an order that rotates with the prompt (so
drift in machine load spreads over all of them), after one untimed warm-up generation.
For each video:
- adherence, read from the pixels by ``score_clip``: is the object the prompt's colour, and
  does it move in the prompt's direction;
- fidelity to the full-compute video of the same prompt and seed: PSNR and SSIM against the
  ``none`` policy's frames (``none`` is always generated: it is the reference);
- the runtime's own stats: denoising seconds, share of layer calls skipped.
Per policy: colour, direction and both-correct adherence (%), mean PSNR and SSIM vs none,
mean skipped share, median denoising seconds and the speedup over none (summed denoising
seconds of none / of the policy). The mean PSNR leaves out prompts whose frames equal none's
(infinite PSNR) and counts them separately; it is "inf" when every prompt is identical.
In the JSON, infinite values are the string "inf" (JSON has no infinity).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np

from foresight import ConfigError, make_config
from tools import common
from tools.common import POLICIES, csv_choices, fmt
from tools.metrics import psnr, ssim
from tools.synthetic import BACKGROUNDS, COLORS, REFERENCE_SIZE, held_out_prompts, parse_prompt

REFERENCE_POLICY = "none"
PROMPT_SEED = 12345  # the default held-out prompt draw (compare.py's too)
# Scorer constants, in RGB units and in pixels of a 32x32 frame (scaled by min(H, W) / 32).
MASK_THRESHOLD = 45.0  # RGB distance from the background above which a pixel is object; half the
#                        palette's 90+ px minimum background-object distance (tools/synthetic.py)
MIN_DISPLACEMENT = 1.5  # px over the clip along the dominant axis; less is "none" (not moving)
MIN_OBJECT_PIXELS = 2  # a frame whose mask holds fewer pixels has no object
NONE = "none"  # the detected direction of a still, lost or absent object; never correct


log = common.logger("evaluate")


# ------------------------------------------------------------------ scoring one clip
def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(d))]


def score_clip(frames: np.ndarray, prompt: str) -> dict:
    """Read colour, direction and background from a uint8 (F, H, W, 3) video and compare with the prompt.

    Background: the per-channel median of the border pixels of all frames. Object: the pixels
    farther than MASK_THRESHOLD from it; its colour is the palette colour nearest the median
    of the object's core (the farther half of its pixels from the background). Direction: the
    least-squares slope of the mask centroid over the frames that show the object, on its
    dominant axis ("down" is +y); "none" when the object is missing in most frames or moves
    less than MIN_DISPLACEMENT px (at 32x32) over the clip.
    """
    want = parse_prompt(prompt)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3) (got {frames.dtype} {frames.shape})")
    n, h, w, _ = frames.shape
    video = frames.astype(np.float64)

    border = np.concatenate([video[:, 0], video[:, -1], video[:, 1:-1, 0], video[:, 1:-1, -1]], axis=1)  # (F, P, 3)
    background = np.median(border.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(video - background, axis=-1)  # (F, H, W)
    mask = distance > MASK_THRESHOLD

    detected_color, object_rgb = None, None
    if mask.any():
        # The object's core: its farther half from the background. Anti-aliased edge pixels are
        # blends towards the background, and in small objects they would pull the median there.
        core = mask & (distance >= np.median(distance[mask]))
        object_rgb = np.median(video[core], axis=0)
        detected_color = _nearest(object_rgb, COLORS)

    counts = mask.sum(axis=(1, 2))  # (F,)
    shown = np.flatnonzero(counts >= MIN_OBJECT_PIXELS)
    direction, displacement = NONE, 0.0
    if len(shown) >= 2 and len(shown) * 2 > n:  # the object is there in most frames
        ys, xs = np.arange(h, dtype=np.float64) + 0.5, np.arange(w, dtype=np.float64) + 0.5
        m = mask[shown].astype(np.float64)
        cx = (m.sum(axis=1) * xs).sum(axis=1) / counts[shown]  # (S,) centroids, px
        cy = (m.sum(axis=2) * ys).sum(axis=1) / counts[shown]
        t = shown.astype(np.float64)
        sx, sy = np.polyfit(t, cx, 1)[0], np.polyfit(t, cy, 1)[0]  # px per frame
        slope, axis_names = (sx, ("left", "right")) if abs(sx) >= abs(sy) else (sy, ("up", "down"))
        displacement = float(slope * (n - 1))
        if abs(displacement) >= MIN_DISPLACEMENT * min(h, w) / REFERENCE_SIZE:
            direction = axis_names[int(slope > 0)]

    detected_background = _nearest(background, BACKGROUNDS)
    return {
        "color_ok": detected_color == want["color"],
        "direction_ok": direction == want["direction"],
        "background_ok": detected_background == want["background"],
        "detected_color": detected_color,
        "detected_direction": direction,
        "detected_background": detected_background,
        "object_rgb": None if object_rgb is None else [round(float(v), 1) for v in object_rgb],
        "displacement_px": abs(displacement),
        "object_frames": int(len(shown)),
    }


# ------------------------------------------------------------------ generating and aggregating
def load_runtime(engines_dir, backend: str):
    """The runtime under evaluation (tests replace this with a fake that has ``generate``)."""
    from runtime import Runtime

    return Runtime.load(engines_dir, backend=backend)


def policy_options(policies, overrides: dict) -> dict[str, dict]:
    """Each policy's share of ``overrides``: an option goes to every policy that takes it
    (``warmup`` to static and foresight alike). Validated here, before any engine loads."""
    given = {k: v for k, v in overrides.items() if v is not None}
    out, used = {}, set()
    for policy in policies:
        takes = {f.name for f in fields(type(make_config(policy)))}
        out[policy] = {k: v for k, v in given.items() if k in takes}
        used |= set(out[policy])
        make_config(policy, **out[policy])  # raises ConfigError with the fix
    unused = sorted(set(given) - used)
    if unused:
        raise ConfigError(f"{', '.join(unused)} apply to none of the policies {', '.join(policies)}; "
                          "drop them or add a policy that takes them")
    return out


def mean_psnr(values: list[float]) -> float:
    """Mean over the finite values (identical frames have infinite PSNR); inf when all are."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.inf


def adherence(rows: list[dict]) -> dict:
    """Colour, direction and both-right adherence in % over rows with ``color_ok`` / ``direction_ok``."""
    n = len(rows)
    return {
        "color_adherence": 100.0 * sum(r["color_ok"] for r in rows) / n,
        "direction_adherence": 100.0 * sum(r["direction_ok"] for r in rows) / n,
        "both_adherence": 100.0 * sum(r["color_ok"] and r["direction_ok"] for r in rows) / n,
    }


def _aggregate(policy: str, rows: list[dict]) -> dict:
    n = len(rows)
    seconds = [r["denoise_seconds"] for r in rows]
    return {
        "policy": policy,
        "prompts": n,
        **adherence(rows),
        "mean_psnr_vs_none": mean_psnr([r["psnr_vs_none"] for r in rows]),
        "identical_to_none": sum(math.isinf(r["psnr_vs_none"]) for r in rows),
        "mean_ssim_vs_none": statistics.fmean(r["ssim_vs_none"] for r in rows),
        "mean_skipped_share": statistics.fmean(r["skipped_share"] for r in rows),
        "median_denoise_seconds": statistics.median(seconds),
        "total_denoise_seconds": sum(seconds),
    }


def evaluate(engines_dir, prompts, seed: int = 0, policies=("none", "foresight"), backend: str = "onnxruntime",
             steps: int | None = None, guidance: float | None = None, **overrides) -> dict:
    """Generate every prompt with every policy, score adherence and fidelity to ``none``; see the module docstring.

    Returns {"rows": one dict per prompt and policy, "aggregates": one per policy, "config": the inputs}.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate: pass at least one")
    for p in prompts:
        parse_prompt(p)  # only this domain's prompts can be scored: fail before the slow part
    policies = list(dict.fromkeys(policies))
    if REFERENCE_POLICY not in policies:
        log(f"adding policy {REFERENCE_POLICY!r}: it is the reference for PSNR, SSIM and speedup")
        policies.insert(0, REFERENCE_POLICY)
    options = policy_options(policies, overrides)
    if steps is not None and steps < 1:
        raise ConfigError(f"steps must be >= 1 (got {steps}); pass --steps 1 or more")

    rt = load_runtime(engines_dir, backend)

    def generate(prompt: str, prompt_seed: int, policy: str):
        extra = {} if guidance is None else {"guidance_scale": guidance}
        return rt.generate(prompt, seed=prompt_seed, policy=policy, num_inference_steps=steps, **extra,
                           **options[policy])

    generate(prompts[0], seed, REFERENCE_POLICY)  # warm-up, untimed: first-call costs stay out of the ratios
    rows, configs = [], {}
    for i, prompt in enumerate(prompts):
        results = {policy: generate(prompt, seed + i, policy) for policy in common.rotated(policies, i)}
        reference = results[REFERENCE_POLICY].frames
        for policy in policies:
            r = results[policy]
            configs.setdefault(policy, r.stats.get("policy_config"))
            rows.append({
                "prompt": prompt, "seed": seed + i, "policy": policy,
                **score_clip(r.frames, prompt),
                "psnr_vs_none": psnr(r.frames, reference),
                "ssim_vs_none": ssim(r.frames, reference),
                "denoise_seconds": r.stats["denoise_seconds"],
                "skipped_share": r.stats.get("skipped_share", 0.0),
                "layer_calls_skipped": r.stats.get("layer_calls_skipped", 0),
            })
        log(f"[{i + 1}/{len(prompts)}] {prompt!r}: " + ", ".join(
            f"{row['policy']} {'C' if row['color_ok'] else '-'}{'D' if row['direction_ok'] else '-'}"
            for row in rows[-len(policies):]))

    aggregates = [_aggregate(p, [r for r in rows if r["policy"] == p]) for p in policies]
    base = aggregates[0]["total_denoise_seconds"]  # policies[0] is none
    for a in aggregates:
        a["speedup_vs_none"] = base / a["total_denoise_seconds"] if a["total_denoise_seconds"] > 0 else math.inf
        a["policy_config"] = configs.get(a["policy"])
    return {
        "config": {"engines": str(engines_dir), "backend": backend, "steps": steps, "guidance": guidance, "seed": seed,
                   "policies": policies, "overrides": {k: v for k, v in overrides.items() if v is not None},
                   "prompts": len(prompts)},
        "rows": rows,
        "aggregates": aggregates,
    }


# ------------------------------------------------------------------ report
def table(aggregates: list[dict]) -> str:
    head = ["policy", "colour %", "direction %", "both %", "PSNR vs none (dB)", "SSIM vs none", "layers skipped",
            "denoise s (median)", "speedup"]
    return common.markdown_table(head, [[
        a["policy"], f"{a['color_adherence']:.1f}", f"{a['direction_adherence']:.1f}",
        f"{a['both_adherence']:.1f}", fmt(a["mean_psnr_vs_none"], ".2f"), f"{a['mean_ssim_vs_none']:.4f}",
        f"{100 * a['mean_skipped_share']:.1f}%", f"{a['median_denoise_seconds']:.3f}",
        fmt(a["speedup_vs_none"], ".2f") + "x",
    ] for a in aggregates])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate",
        description="Prompt adherence (colour, direction) and fidelity to full compute (PSNR, SSIM) of each policy "
        "on held-out prompts of the synthetic domain, with skipped share and denoising speedup.",
    )
    ap.add_argument("--engines", type=Path, required=True,
                    help="engines folder of a model trained on tools/synthetic.py")
    ap.add_argument("--prompts", type=int, default=32, help="number of held-out prompts (default 32)")
    ap.add_argument("--prompt-seed", type=int, default=PROMPT_SEED,
                    help=f"seed of held_out_prompts (default {PROMPT_SEED})")
    ap.add_argument("--seed", type=int, default=0, help="generation seed of prompt 0; prompt i uses seed + i")
    ap.add_argument("--policies", type=csv_choices(POLICIES), default=["none", "static", "foresight"],
                    help=f"comma-separated (default none,static,foresight; {REFERENCE_POLICY} is always added)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the manifest's)")
    ap.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the manifest's)")
    ap.add_argument("--warmup", type=int, default=None, help="policy option, for every policy that takes it")
    ap.add_argument("--recalculate", type=int, default=None, help="foresight option")
    ap.add_argument("--threshold", type=float, default=None, help="foresight option")
    ap.add_argument("--json", type=Path, default=None, help="write per-prompt rows, aggregates and the command")
    return ap


def run_evaluate(args, command: str) -> dict:
    if args.prompts < 1:
        raise ConfigError("--prompts must be >= 1")
    report = evaluate(args.engines, held_out_prompts(args.prompts, args.prompt_seed), seed=args.seed,
                      policies=args.policies, backend=args.backend, steps=args.steps, guidance=args.guidance,
                      warmup=args.warmup, recalculate=args.recalculate, threshold=args.threshold)
    report["command"] = command
    report["table"] = table(report["aggregates"])
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.report_main("evaluate", args, argv, run_evaluate)


if __name__ == "__main__":
    sys.exit(main())
