"""Resident memory over many generations with prompts of different lengths.

    python -m tools.rss --engines engines/latte-tiny --runs 100

Every distinct prompt length is a new text-token shape, so a runtime that kept one buffer
pool per shape forever grew with every new prompt. Prints the resident set size (RSS)
every ``--every`` runs and the pool counters; the RSS after warm-up should stay flat.
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

WORDS = ("a red green blue yellow purple white square circle triangle moving slowly quickly left right up down "
         "across the frame on over a gray black navy brown background").split()
MAX_WORDS = 100  # every word is one token of the shipped models' tokenizers, and they take 120


def rss_mib() -> float:
    """The current resident set size (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pool-cache", type=int, default=None,
                    help="buffer pools kept (default: the runtime's bound; a large value shows the unbounded growth)")
    ap.add_argument("--json", type=Path, default=None, help="also write the samples as JSON")
    args = ap.parse_args(argv)
    from runtime import Runtime

    rt = Runtime.load(args.engines, backend="onnxruntime", device="cpu")
    if args.pool_cache:
        rt.POOL_CACHE_SIZE = args.pool_cache
    samples = []
    for i in range(args.runs):
        n = 1 + i % MAX_WORDS  # a new prompt length every run (up to MAX_WORDS)
        rt.generate(" ".join((WORDS * 4)[:n]), num_inference_steps=args.steps, policy="none", decode=False)
        if (i + 1) % args.every == 0 or i == 0:
            samples.append({"runs": i + 1, "rss_mib": round(rss_mib(), 1), "pools_cached": len(rt._pools),
                            "pools_created": rt.pools_created})
            print(f"runs {i + 1:4d}  rss {samples[-1]['rss_mib']:8.1f} MiB  pools cached {len(rt._pools)}  "
                  f"created {rt.pools_created}", flush=True)
    growth = samples[-1]["rss_mib"] - samples[1]["rss_mib"] if len(samples) > 1 else 0.0
    print(f"RSS growth after run {samples[1]['runs'] if len(samples) > 1 else 1}: {growth:+.1f} MiB")
    result = {"engines": str(args.engines), "runs": args.runs, "steps": args.steps,
              "pool_cache": rt.POOL_CACHE_SIZE, "samples": samples,
              "growth_mib": round(growth, 1)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
