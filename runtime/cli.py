"""``foresight-run``: generate a video from an engines folder (a thin layer over ``Runtime``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from foresight import POLICIES, ConfigError

from .errors import ForesightError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="foresight-run",
        description="Generate a video with per-layer engines, reusing layers the Foresight controller marks as stable.",
    )
    ap.add_argument("--engines", required=True, type=Path, help="engines folder written by foresight-export")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", required=True, type=Path, help="video file to write (.mp4 or .gif)")
    ap.add_argument("--negative-prompt", default=None)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; <= 1 disables CFG")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--policy", choices=POLICIES, default="foresight")
    g = ap.add_argument_group("Foresight (policy foresight; defaults from the manifest)")
    g.add_argument("--warmup", type=int, default=None, help="steps that compute every layer (>= 2)")
    g.add_argument("--recalculate", type=int, default=None, help="after warmup, every R-th step computes every layer")
    g.add_argument("--threshold", type=float, default=None, help="scale on the calibrated per-layer change (>= 0)")
    s = ap.add_argument_group("static reuse (policy static)")
    s.add_argument("--reuse", type=int, default=None, help="reuse the whole stack N steps ...")
    s.add_argument("--period", type=int, default=None, help="... out of every R")
    ap.add_argument("--backend", choices=["onnxruntime", "torch", "tensorrt"], default="onnxruntime",
                    help="tensorrt needs engines built with foresight-export --backend tensorrt and a GPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--checkpoint", default=None, help="torch backend: the source checkpoint if it moved")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="torch and tensorrt backends on CUDA: capture each part once per buffer set and replay it")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="torch backend compute dtype (engines keep the precision they were exported in)")
    ap.add_argument("--vae-tiling", action="store_true",
                    help="decode in spatial tiles (diffusers' enable_tiling): bounded memory for large or long videos")
    ap.add_argument("--stats", type=Path, default=None, help="write stats and the decision trace as JSON")
    ap.add_argument("--heatmap", type=Path, default=None, help="write a PNG of computed vs reused layers per step")
    ap.add_argument("--save-frames", type=Path, default=None, help="also save the uint8 frames as .npy")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def policy_overrides(args) -> dict:
    names = {"foresight": ("warmup", "recalculate", "threshold"), "static": ("warmup", "reuse", "period"), "none": ()}
    given = {k: getattr(args, k) for k in ("warmup", "recalculate", "threshold", "reuse", "period")
             if getattr(args, k) is not None}
    wrong = sorted(set(given) - set(names[args.policy]))
    if wrong:
        raise ConfigError(
            f"--{', --'.join(wrong)} do(es) not apply to --policy {args.policy}; "
            f"it takes {', '.join('--' + n for n in names[args.policy]) or 'no options'}"
        )
    return given


def run(args) -> dict:
    from .video import VIDEO_SUFFIXES, atomic_write, check_output_path, save_frames, write_video

    # Every output path is checked before any engine is loaded.
    check_output_path(args.out, VIDEO_SUFFIXES)
    for extra, suffixes in ((args.stats, (".json",)), (args.heatmap, (".png",)), (args.save_frames, (".npy",))):
        if extra is not None:
            check_output_path(extra, suffixes)
    overrides = policy_overrides(args)
    from foresight import make_config

    make_config(args.policy, **overrides)  # validate before the slow load (defaults are filled in later)

    from .engine import Runtime

    if args.backend != "torch" and (args.checkpoint or args.dtype):
        raise ConfigError("--checkpoint and --dtype apply to --backend torch only; engines keep the precision "
                          "they were exported in")
    if args.cuda_graphs and args.backend == "onnxruntime":
        raise ConfigError("--cuda-graphs applies to --backend torch or tensorrt on --device cuda")
    kwargs = {k: v for k, v in (("checkpoint", args.checkpoint), ("dtype", args.dtype),
                                ("cuda_graphs", args.cuda_graphs)) if v}
    runtime = Runtime.load(args.engines, backend=args.backend, device=args.device, **kwargs)
    if args.vae_tiling:
        runtime.parts.enable_vae_tiling()
    result = runtime.generate(
        args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height,
        width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        policy=args.policy, progress=not args.quiet, **overrides,
    )
    stats = result.stats
    write_video(result.frames, args.out, fps=args.fps or runtime.parts.config.get("fps", 8))
    if args.save_frames:
        save_frames(result.frames, args.save_frames)
    if args.heatmap:
        from .heatmap import plot_reuse_heatmap

        plot_reuse_heatmap(result.trace, args.heatmap)
    if args.stats:
        atomic_write(args.stats, lambda p: Path(p).write_text(json.dumps(stats, indent=1) + "\n"))
    total = stats["steps"] * stats["num_layers"]
    print(
        f"{args.out}: {stats['frames']} frames {stats['height']}x{stats['width']}, policy {stats['policy']}, "
        f"backend {stats['backend']}\n"
        f"layer calls: {stats['layer_calls']}/{total} run, {stats['layer_calls_skipped']} skipped "
        f"({100 * stats['skipped_share']:.1f}%)\n"
        f"seconds: text {stats['text_encode_seconds']:.2f}, denoise {stats['denoise_seconds']:.2f}, "
        f"decode {stats['decode_seconds']:.2f}, total {stats['total_seconds']:.2f}",
        file=sys.stderr,
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ForesightError, ConfigError) as exc:
        print(f"foresight-run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("foresight-run: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
