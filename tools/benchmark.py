"""Denoising-loop benchmark: the reference pipeline against this runtime, side by side.

The reference is diffusers' pipeline for Latte (``LattePipeline``) and CogVideoX
(``CogVideoXPipeline``), and our eager Open-Sora 1.2 pipeline (``OpenSoraPipeline``, the
runtime's oracle) for Open-Sora, which diffusers does not have; the row is still named
``diffusers`` for Open-Sora in the table and the JSON, its eager reference.

    python -m tools.benchmark --steps 50 --repeats 3 --json /tmp/bench.json

One process, one model (the checkpoint the engines folder was exported from), one prompt
and seed. Configurations: diffusers eager (the baseline), then the runtime on each of
``--backends`` x ``--policies`` (policy options: the manifest's Foresight defaults, the
static config's own). For each: the median of the denoising seconds, the speedup over
diffusers' median, the share of layer calls skipped, and the PSNR of the frames against
the same backend's ``none`` output and against diffusers' frames.

What is timed -- the denoising loop only, the same window on both sides: from just before
the first step to just after the last (per step: scale_model_input, the transformer or the
engine calls, guidance, scheduler.step; for the runtime also its controller and buffer
copies). Text encoding, timestep and latent setup and the VAE decode are outside it.
- Runtime: ``stats["denoise_seconds"]``, measured by ``Runtime.generate`` itself.
- Diffusers: ``LattePipeline.__call__`` (and ``CogVideoXPipeline.__call__``) wraps exactly its denoising loop in
  ``with self.progress_bar(total=...)``. The harness gives the pipeline a ``progress_bar``
  that stamps ``perf_counter`` on entering and leaving that block (tqdm disabled). Chosen
  over "pipeline total minus a separately timed ``encode_prompt``", which would also count
  input checks, ``set_timesteps`` and ``prepare_latents`` and subtract a second, noisy
  measurement; and over ``callback_on_step_end`` stamps, which need some other hook to see
  where the first step starts. If a diffusers version opens the progress bar other than
  once per call, the harness stops rather than report a wrong window.

Protocol: every configuration runs once to warm up (decoding frames: the quality numbers
come from these runs), then ``--repeats`` rounds, each running every configuration once in
the same order (round-robin, so drift in machine load spreads over all of them). Timed runs
skip the VAE decode; their final latents are compared with the warm-up's, and a
configuration whose runs differ is flagged non-deterministic in the table and the JSON.
Thread counts are left at their defaults and recorded (torch intra-op threads; ONNX
Runtime's intra-op pool is its default, one thread per physical core).

In the JSON, a PSNR of identical frames is the string "inf" (JSON has no infinity).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field

from foresight import ConfigError
from runtime.backends import BACKENDS
from tools import common, harness
from tools.common import POLICIES, csv_choices, fmt
from tools.harness import BASELINE, Run
from tools.metrics import psnr

log = common.logger("benchmark")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="benchmark",
        description="Median denoising seconds of the diffusers pipeline (Latte, CogVideoX) and of the runtime (backends x policies), "
        "interleaved in one process, with speedup, share of layers skipped and PSNR.",
    )
    harness.add_engines_arg(ap)
    ap.add_argument("--checkpoint", default=None,
                    help="diffusers checkpoint for the baseline (default: the manifest's source; the runtime's "
                         "backends, torch included, read only the engines folder)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration after one warm-up (default 3)")
    ap.add_argument("--prompt", default=harness.DEFAULT_PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", type=csv_choices(BACKENDS), default=["onnxruntime", "torch"],
                    help=f"comma-separated from {','.join(BACKENDS)} (default onnxruntime,torch; tensorrt needs a GPU)")
    ap.add_argument("--policies", type=csv_choices(POLICIES), default=list(POLICIES),
                    help=f"comma-separated (default {','.join(POLICIES)})")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    common.add_report_args(ap, "write configuration, medians, all samples and machine info")
    return ap


@dataclass
class Config:
    name: str
    backend: str | None = None  # None: the diffusers baseline
    policy: str | None = None


@dataclass
class Row:
    config: Config
    warmup_seconds: float = 0.0
    samples: list[float] = field(default_factory=list)
    deterministic: bool = True
    stats: dict = field(default_factory=dict)
    frames: "object" = None
    latents: "object" = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


# ------------------------------------------------------------------ report
def table(rows: list[dict]) -> str:
    head = ["config", "denoise s (median)", "min-max s", "ms/step", "speedup", "layers skipped",
            "PSNR vs none (dB)", "PSNR vs diffusers (dB)"]
    return common.markdown_table(head, [[
        r["config"] + ("" if r["deterministic"] else " (non-deterministic!)"), f"{r['median_seconds']:.3f}",
        f"{min(r['samples_seconds']):.3f}-{max(r['samples_seconds']):.3f}",
        f"{1000 * r['median_seconds'] / r['steps']:.1f}", f"{r['speedup']:.2f}x", f"{100 * r['skipped_share']:.1f}%",
        fmt(r["psnr_vs_none"], ".2f"), fmt(r["psnr_vs_diffusers"], ".2f"),
    ] for r in rows])


def markdown_section(report: dict) -> str:
    c, m = report["config"], report["machine"]
    return common.markdown_section(report, f"{c['model']}, {c['steps']} steps, {c['repeats']} repeats, {m['device']}",
                                   f"{harness.machine_summary(m)} Prompt {c['prompt']!r}, seed {c['seed']}.")


# ------------------------------------------------------------------ the benchmark
def run_benchmark(args, command: str) -> dict:
    if args.steps < 1 or args.repeats < 1:
        raise ConfigError("--steps and --repeats must be >= 1")
    engines = harness.ensure_engines(args.engines, log)

    from runtime import Runtime
    from runtime.manifest import load_manifest

    manifest = load_manifest(engines)
    checkpoint = args.checkpoint or manifest.source["checkpoint"]
    machine = harness.machine_info(args.device)
    harness.warn_if_busy(machine, log)
    log(f"{manifest.name} from {checkpoint}: {args.steps} steps, 1 warm-up + {args.repeats} interleaved runs "
        f"per configuration; torch {machine['torch_num_threads']} threads, {machine['cpus_usable']} CPUs")

    runners = {BASELINE: harness.baseline_runner(checkpoint, manifest, args.device)}
    configs = [Config(BASELINE)]
    runtimes = {}
    for backend in args.backends:
        runtimes[backend] = Runtime.load(engines, backend=backend, device=args.device)  # reads only the folder
        for policy in args.policies:
            name = f"{backend}/{policy}"
            configs.append(Config(name, backend, policy))
            runners[name] = harness.RuntimeRunner(runtimes[backend], policy)
    rows = {c.name: Row(c) for c in configs}

    def run(config: Config, decode: bool) -> Run:
        return runners[config.name](args.prompt, args.seed, args.steps, decode)

    for i, c in enumerate(configs, 1):
        out = run(c, decode=True)
        row = rows[c.name]
        row.warmup_seconds, row.frames, row.stats = out.seconds, out.frames, out.stats
        log(f"warm-up [{i}/{len(configs)}] {c.name}: {out.seconds:.3f} s")
    reference_frames = {}  # backend -> frames of its `none` policy
    for backend, rt in runtimes.items():
        if f"{backend}/none" in rows:
            reference_frames[backend] = rows[f"{backend}/none"].frames
        else:
            log(f"{backend}/none is not benchmarked: generating it once (untimed) as the PSNR reference")
            reference_frames[backend] = rt.generate(args.prompt, seed=args.seed, num_inference_steps=args.steps,
                                                    policy="none").frames

    import torch

    for r in range(1, args.repeats + 1):
        for i, c in enumerate(configs, 1):
            out = run(c, decode=False)
            row = rows[c.name]
            row.samples.append(out.seconds)
            if row.latents is None:
                row.latents = out.latents
            elif not torch.equal(row.latents, out.latents):
                row.deterministic = False
            log(f"repeat {r}/{args.repeats} [{i}/{len(configs)}] {c.name}: {out.seconds:.3f} s")

    machine["loadavg_end"] = harness.loadavg()  # recorded, not judged: this process's own runs raise it
    baseline = rows[BASELINE]
    results = []
    for c in configs:
        row = rows[c.name]
        ref = baseline.frames if c.backend is None else reference_frames[c.backend]
        results.append({
            "config": c.name,
            "backend": c.backend or BASELINE,
            "policy": c.policy,
            "policy_config": row.stats.get("policy_config"),
            "steps": args.steps,
            "median_seconds": row.median,
            "samples_seconds": row.samples,
            "warmup_seconds": row.warmup_seconds,
            "speedup": baseline.median / row.median,
            "layer_calls": row.stats.get("layer_calls"),
            "layer_calls_skipped": row.stats.get("layer_calls_skipped", 0),
            "skipped_share": row.stats.get("skipped_share", 0.0),
            "psnr_vs_none": psnr(row.frames, ref),
            "psnr_vs_diffusers": psnr(row.frames, baseline.frames),
            "deterministic": row.deterministic,
        })
    report = {
        "date": common.utc_now(),
        "command": command,
        "config": {
            "model": manifest.name, "engines": str(engines), "checkpoint": str(checkpoint),
            "steps": args.steps, "repeats": args.repeats, "prompt": args.prompt, "seed": args.seed,
            "backends": args.backends, "policies": args.policies, **harness.manifest_defaults(manifest),
            "timing": "denoising loop only (see tools/benchmark.py docstring); median over interleaved repeats",
        },
        "machine": machine,
        "results": results,
    }
    report["table"] = table(results)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.report_main("benchmark", args, argv, run_benchmark, markdown_section)


if __name__ == "__main__":
    sys.exit(main())
