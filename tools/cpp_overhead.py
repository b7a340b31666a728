"""The C++ runtime against the Python runtime on the same AOTInductor engines folder: per-step time of
the denoising loop (engines plus each runtime's host work between them), text encoding, decoding, one
generation end to end, and a whole CLI run (process start, load, generate, write), side by side.

    python -m tools.cpp_overhead --engines engines/latte-tiny-aoti --cli build/cpp/foresight-run-cpp \
        --steps 50 --repeats 5 --json benchmarks/cpp-overhead-latte.json

Both sides run the same compiled programs (the Python runtime with ``compiled_components=True``, so its
text encoder and VAE decoder are the C++ runtime's too) and give the same frames; the rounds are
interleaved so machine noise hits both. The C++ generation times are the ones foresight-run-cpp reports
in its --stats (inside its process, after loading); the Python ones come from Runtime.generate in this
process, loaded once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("text_encode_seconds", "denoise_seconds", "decode_seconds", "total_seconds")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, required=True, help="an engines folder with AOTInductor packages and "
                    "compiled components (foresight-export --backend aoti, Latte)")
    ap.add_argument("--cli", type=Path, default=Path("build/cpp/foresight-run-cpp"), help="the foresight-run-cpp "
                    "executable (default build/cpp/foresight-run-cpp)")
    ap.add_argument("--prompt", default="a red square moving left on a gray background")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default="none,foresight")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.cli.is_file():
        ap.error(f"--cli {args.cli} does not exist: build cpp/ (README, C and C++ hosts) or pass the executable")
    if args.repeats < 1 or args.steps < 1:
        ap.error("--steps and --repeats must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from runtime import Runtime

    rt = Runtime.load(args.engines, backend="aoti", device="cpu", compiled_components=True)
    policies = args.policies.split(",")
    rows: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--engines", str(args.engines), "--prompt", args.prompt, "--steps", str(args.steps), "--seed", "0"]
        for policy in policies:  # warm both sides up once
            rt.generate(args.prompt, num_inference_steps=args.steps, seed=0, policy=policy)
        for r in range(args.repeats):
            for policy in policies:
                res = rt.generate(args.prompt, num_inference_steps=args.steps, seed=0, policy=policy)
                rows.setdefault(("python", policy), []).append({k: res.stats[k] for k in KEYS})
                t0 = time.perf_counter()
                done = subprocess.run([str(args.cli), *common, "--policy", policy, "--out", str(tmp / "f.npy"),
                                       "--stats", str(tmp / "s.json")], capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if done.returncode:
                    sys.exit(f"error: foresight-run-cpp failed: {done.stderr.strip()}")
                stats = json.loads((tmp / "s.json").read_text())
                rows.setdefault(("c++", policy), []).append({**{k: stats[k] for k in KEYS}, "cli_seconds": wall})
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "runtime.cli", *common, "--policy", policy, "--backend",
                                       "aoti", "--device", "cpu", "--compiled-components", "--quiet", "--out",
                                       str(tmp / "v.mp4")], capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"error: foresight-run failed: {done.stderr.strip()}")
                rows[("python", policy)][-1]["cli_seconds"] = time.perf_counter() - t0
            print(f"round {r + 1}/{args.repeats} done", file=sys.stderr)
    table = []
    for (side, policy), runs in rows.items():
        med = {k: statistics.median(run[k] for run in runs) for k in (*KEYS, "cli_seconds")}
        table.append({"runtime": side, "policy": policy, **med, "ms_per_step": 1000 * med["denoise_seconds"] / args.steps})
    lines = ["| runtime | policy | ms/step | denoise s | text s | decode s | generate s | CLI run s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in sorted(table, key=lambda t: (t["policy"], t["runtime"])):
        lines.append(f"| {t['runtime']} | {t['policy']} | {t['ms_per_step']:.2f} | {t['denoise_seconds']:.3f} | "
                     f"{t['text_encode_seconds']:.4f} | {t['decode_seconds']:.4f} | {t['total_seconds']:.3f} | "
                     f"{t['cli_seconds']:.2f} |")
    for policy in policies:
        py = next(t for t in table if t["runtime"] == "python" and t["policy"] == policy)
        cpp = next(t for t in table if t["runtime"] == "c++" and t["policy"] == policy)
        lines.append(f"\n{policy}: host overhead saved per step {py['ms_per_step'] - cpp['ms_per_step']:.2f} ms "
                     f"(Python/C++ denoise {py['denoise_seconds'] / cpp['denoise_seconds']:.2f}x, CLI run "
                     f"{py['cli_seconds'] / cpp['cli_seconds']:.2f}x)")
    text = "\n".join(lines)
    print(text)
    report = {"command": "python -m tools.cpp_overhead " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": args.steps, "repeats": args.repeats, "rows": table, "table": text}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
