"""``foresight-run``: generate a video from an engines folder (a thin layer over ``Runtime``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from foresight import POLICIES, policy_options

from .errors import ConfigError, ForesightError


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
    ap.add_argument("--guidance-2", type=float, default=None,
                    help="two-expert models (Wan 2.2 A14B): the low-noise expert's guidance scale (default: the "
                         "checkpoint's, else --guidance)")
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
    r = ap.add_argument_group("replay (policy replay)")
    r.add_argument("--trace", type=Path, default=None,
                   help="follow the decisions of this trace: a foresight-run --stats file or a saved trace")
    ap.add_argument("--backend", choices=["onnxruntime", "torch", "aoti", "tensorrt"], default="onnxruntime",
                    help="aoti needs packages built with foresight-export --backend aoti for this device; tensorrt "
                         "needs engines built with foresight-export --backend tensorrt and a GPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="torch, aoti and tensorrt backends on CUDA: capture each part once per buffer set and replay it")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                    help="torch backend compute dtype (engines keep the precision they were exported in)")
    ap.add_argument("--vae-tiling", action="store_true",
                    help="decode in spatial tiles (diffusers' enable_tiling): bounded memory for large or long videos")
    ap.add_argument("--compiled-components", action="store_true",
                    help="encode the prompt and decode the video with the folder's AOTInductor text encoder and VAE "
                    "decoder (foresight-export --backend aoti compiles them; a video VAE's for the default frame "
                    "count), as foresight-run-cpp does")
    ap.add_argument("--stats", type=Path, default=None, help="write stats and the decision trace as JSON")
    ap.add_argument("--heatmap", type=Path, default=None, help="write a PNG of computed vs reused layers per step")
    ap.add_argument("--save-frames", type=Path, default=None, help="also save the uint8 frames as .npy")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


POLICY_FLAGS = ("warmup", "recalculate", "threshold", "reuse", "period")


def policy_overrides(args) -> dict:
    """The policy flags given, refused unless the chosen policy takes them (the policy says which)."""
    takes = policy_options(args.policy)
    given = {k: getattr(args, k) for k in POLICY_FLAGS if getattr(args, k, None) is not None}
    wrong = sorted(set(given) - set(takes))
    if wrong:
        raise ConfigError(
            f"--{', --'.join(wrong)} do(es) not apply to --policy {args.policy}; "
            f"it takes {', '.join('--' + n for n in takes) or 'no options'}"
        )
    return given


def replay_policy(path: Path):
    """The replay policy of ``--trace``: a stats.json (its ``trace``) or a saved trace file."""
    from foresight import ReplayPolicy, load_trace

    try:
        data = json.loads(path.read_text())
        trace = load_trace(json.dumps(data["trace"] if isinstance(data, dict) and "trace" in data else data))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"--trace {path}: not a readable decision trace ({exc}); pass a foresight-run --stats "
                          f"file") from None
    return ReplayPolicy.from_trace(trace)


def run(args, outputs) -> dict:
    """Generate and stage every output in ``outputs`` (an OutputSet: they appear together on commit)."""
    from .engine import Runtime, check_request, resolve_device
    from .manifest import load_manifest
    from .outputs import check_distinct, check_output_path
    from .video import VIDEO_SUFFIXES, save_frames, write_video

    # Everything a user can get wrong is checked before any engine is loaded.
    given = {"--out": (args.out, VIDEO_SUFFIXES), "--stats": (args.stats, (".json",)),
             "--heatmap": (args.heatmap, (".png",)), "--save-frames": (args.save_frames, (".npy",))}
    given = {flag: v for flag, v in given.items() if v[0] is not None}
    for path, suffixes in given.values():
        check_output_path(path, suffixes, engines=args.engines)
    check_distinct({flag: path for flag, (path, _) in given.items()})
    overrides = policy_overrides(args)
    if (args.trace is not None) != (args.policy == "replay"):
        raise ConfigError("--policy replay takes --trace FILE, and --trace applies to --policy replay only")
    if args.trace is not None:
        policy = replay_policy(args.trace)
    else:
        from foresight import make_config

        make_config(args.policy, **overrides)  # validate before the slow load (defaults are filled in later)
        policy = args.policy
    if args.backend != "torch" and args.dtype:
        raise ConfigError("--dtype applies to --backend torch only; engines keep the precision they were exported in")
    if args.cuda_graphs and args.backend == "onnxruntime":
        raise ConfigError("--cuda-graphs applies to --backend torch, aoti or tensorrt on --device cuda")
    device = resolve_device(args.device)
    manifest = load_manifest(args.engines)
    if args.trace is not None and args.steps is None:
        args.steps = len(policy.decisions)  # a replay runs as many steps as its trace
    request = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames,
                   height=args.height, width=args.width, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, seed=args.seed, guidance_scale_2=args.guidance_2)
    check_request(manifest, **request)
    if args.trace is not None:
        policy.check_run(manifest.num_layers, request["num_inference_steps"])
    if args.fps is not None and not 0 < args.fps < 1000:
        raise ConfigError(f"--fps must be in (0, 1000) (got {args.fps})")

    kwargs = {k: v for k, v in (("dtype", args.dtype), ("cuda_graphs", args.cuda_graphs),
                                ("compiled_components", args.compiled_components)) if v}
    runtime = Runtime.load(args.engines, backend=args.backend, device=device, manifest=manifest, **kwargs)
    if args.vae_tiling:
        runtime.parts.enable_vae_tiling()
    result = runtime.generate(**request, policy=policy, progress=not args.quiet, **overrides)
    stats = result.stats
    write_video(result.frames, args.out, fps=args.fps or runtime.parts.config.get("fps", 8), outputs=outputs)
    if args.save_frames:
        save_frames(result.frames, args.save_frames, outputs=outputs)
    if args.heatmap:
        from .heatmap import plot_reuse_heatmap

        plot_reuse_heatmap(result.trace, args.heatmap, outputs=outputs)
    if args.stats:
        outputs.add(args.stats, lambda p: Path(p).write_text(json.dumps(stats, indent=1, allow_nan=False) + "\n"))
    outputs.commit()
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
    from .outputs import OutputSet, terminate_as_interrupt

    args = build_parser().parse_args(argv)
    outputs = OutputSet()
    try:
        with terminate_as_interrupt(), outputs:
            run(args, outputs)
    except ForesightError as exc:
        print(f"foresight-run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = " after the outputs were written" if outputs.committed else "; no output was written"
        print(f"foresight-run: interrupted{done}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
