"""Denoising-loop benchmark: the reference pipeline against this runtime, side by side.

The reference is diffusers' pipeline for Latte (``LattePipeline``) and CogVideoX
(``CogVideoXPipeline``), and our eager Open-Sora 1.2 pipeline (``OpenSoraPipeline``, the
runtime's oracle) for Open-Sora, which diffusers does not have; the row is still named
``diffusers`` for Open-Sora in the table and the JSON, its eager reference.

    python tools/benchmark.py --steps 50 --repeats 3 --json /tmp/bench.json

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
import contextlib
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository's packages and tools/ become importable
    sys.path.insert(0, str(ROOT))

from foresight import POLICIES, ConfigError  # noqa: E402
from runtime.backends import BACKENDS  # noqa: E402
from runtime.errors import ManifestError  # noqa: E402
from tools import common  # noqa: E402
from tools.common import csv_choices  # noqa: E402
from tools.metrics import psnr  # noqa: E402

DEFAULT_ENGINES = Path("engines/latte-tiny")
DEFAULT_PROMPT = "a red panda eating bamboo in a sunny forest"
BASELINE = "diffusers"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="benchmark",
        description="Median denoising seconds of the diffusers pipeline (Latte, CogVideoX) and of the runtime (backends x policies), "
        "interleaved in one process, with speedup, share of layers skipped and PSNR.",
    )
    ap.add_argument("--engines", type=Path, default=DEFAULT_ENGINES,
                    help=f"engines folder (default {DEFAULT_ENGINES}; exported from the tiny preset if missing)")
    ap.add_argument("--checkpoint", default=None,
                    help="diffusers checkpoint for the baseline and the torch backend (default: the manifest's source)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration after one warm-up (default 3)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", type=csv_choices(BACKENDS), default=["onnxruntime", "torch"],
                    help=f"comma-separated from {','.join(BACKENDS)} (default onnxruntime,torch; tensorrt needs a GPU)")
    ap.add_argument("--policies", type=csv_choices(POLICIES), default=list(POLICIES),
                    help=f"comma-separated (default {','.join(POLICIES)})")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--json", type=Path, default=None, help="write configuration, medians, all samples and machine info")
    ap.add_argument("--markdown", type=Path, default=None,
                    help="append a dated section with the command, machine and table (e.g. BENCHMARKS.md)")
    return ap


@dataclass
class Config:
    name: str
    backend: str | None = None  # None: the diffusers baseline
    policy: str | None = None


@dataclass
class Run:
    seconds: float
    latents: "object"  # torch.Tensor (1, C, F, h, w)
    frames: "object" = None  # numpy uint8 (F, H, W, 3) when decoded
    stats: dict = field(default_factory=dict)


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


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ engines and machine
def ensure_engines(path: Path) -> Path:
    if path.exists():
        return path
    log(f"engines folder {path} not found: exporting the tiny Latte preset there first "
        f"(python -m exporter.cli --model latte --preset tiny --out {path})")
    from exporter.export import ExportOptions, export

    return export(ExportOptions(model="latte", preset="tiny", out=path), progress=True)


def machine_info(device: str) -> dict:
    import diffusers
    import torch

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "onnxruntime": ort_version,
        "onnxruntime_intra_op_threads": "default",
        "diffusers": diffusers.__version__,
        "device": device,
        "loadavg_start": loadavg(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def warn_if_busy(machine: dict) -> None:
    load = machine["loadavg_start"]
    if load and load[0] > 0.5 * machine["cpus_usable"]:
        log(f"warning: load average {load[0]:.2f} on {machine['cpus_usable']} CPUs before the runs: other processes "
            "compete for the cores and the timings will be noisy; rerun on a quiet machine")


# ------------------------------------------------------------------ runners
def baseline_kwargs(manifest) -> tuple[str, dict]:
    """The reference pipeline class and the call arguments that match the runtime's defaults."""
    p, shapes = manifest.pipeline, manifest.data["shapes"]
    size = dict(height=shapes["height"]["default"], width=shapes["width"]["default"],
                negative_prompt=p["default_negative_prompt"], guidance_scale=p["default_guidance"])
    family = manifest.data["model"]["family"]
    if family == "latte":
        return "LattePipeline", dict(size, video_length=shapes["frames"]["default"], clean_caption=False,
                                     mask_feature=p.get("mask_text", True),
                                     decode_chunk_size=p.get("decode_chunk_size", 14))
    if family == "cogvideox":
        return "CogVideoXPipeline", dict(size, num_frames=shapes["frames"]["default"],
                                         max_sequence_length=p["max_text_length"],
                                         use_dynamic_cfg=p.get("use_dynamic_cfg", False))
    raise ManifestError(f"the benchmark has no diffusers baseline for {family!r} models")


class WindowTimer:
    """A reference pipeline timed around its denoising loop: ``window()`` wraps the loop and
    stamps ``perf_counter`` on entering and leaving it (after a device sync on CUDA)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self._window: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def window(self):
        self._sync()
        self._window.append(time.perf_counter())
        yield
        self._sync()
        self._window.append(time.perf_counter())


class DiffusersRunner(WindowTimer):
    """The diffusers pipeline (``LattePipeline``, ``CogVideoXPipeline``) eager, called with the
    inputs the runtime derives from the manifest."""

    def __init__(self, checkpoint: str, manifest, device: str):
        import diffusers
        import transformers

        super().__init__(device)
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" would interleave with ours
        self.pipeline_class, self.call_kwargs = baseline_kwargs(manifest)
        try:
            self.pipe = getattr(diffusers, self.pipeline_class).from_pretrained(checkpoint).to(self.device)
        except Exception as exc:  # noqa: BLE001
            raise ManifestError(
                f"diffusers could not load the checkpoint {checkpoint!r} ({exc}); pass its folder with --checkpoint"
            ) from exc
        self.pipe.set_progress_bar_config(disable=True)
        original = self.pipe.progress_bar

        @contextlib.contextmanager
        def timed_progress_bar(*args, **kwargs):
            # LattePipeline and CogVideoXPipeline open this around their denoising loop and nothing else.
            with original(*args, **kwargs) as bar, self.window():
                yield bar

        self.pipe.progress_bar = timed_progress_bar

    def __call__(self, prompt: str, seed: int, steps: int, decode: bool) -> Run:
        import numpy as np

        self._window = []
        out = self.pipe(
            prompt, num_inference_steps=steps, generator=self.torch.Generator("cpu").manual_seed(seed),
            output_type="np" if decode else "latent", **self.call_kwargs,
        ).frames
        if len(self._window) != 2:
            raise RuntimeError(
                f"{self.pipeline_class} opened its progress bar {len(self._window) // 2} times in one call (expected once, "
                "around the denoising loop): this diffusers version needs a new timing hook in tools/benchmark.py"
            )
        seconds = self._window[1] - self._window[0]
        if decode:
            frames = (np.asarray(out[0]) * 255).round().astype(np.uint8)  # (F, H, W, 3)
            return Run(seconds, latents=None, frames=frames)
        return Run(seconds, latents=out)


class OpenSoraReferenceRunner(WindowTimer):
    """Open-Sora 1.2 has no diffusers pipeline: the baseline is our eager reference
    (``exporter.models.opensora_pipeline``; the runtime's oracle), timed around its
    rectified-flow loop (``RFlowSampler.sample``), the same window as the runtime's."""

    def __init__(self, checkpoint: str, manifest, device: str):
        import dataclasses

        from exporter.models.opensora_pipeline import OpenSoraPipeline
        from exporter.models.rflow import RFlowSampler

        super().__init__(device)
        self.pipe = OpenSoraPipeline.from_pretrained(checkpoint).to(self.device)
        runner = self

        @dataclasses.dataclass(frozen=True)
        class TimedRFlow(RFlowSampler):  # dataclasses.replace in the pipeline keeps the subclass
            def sample(self, model_fn, z, timesteps):
                with runner.window():
                    return super().sample(model_fn, z, timesteps)

        self.pipe.scheduler = TimedRFlow(**dataclasses.asdict(self.pipe.scheduler))
        shapes, p = manifest.data["shapes"], manifest.pipeline
        self.call_kwargs = dict(num_frames=shapes["frames"]["default"], height=shapes["height"]["default"],
                                width=shapes["width"]["default"], guidance_scale=p["default_guidance"])

    def __call__(self, prompt: str, seed: int, steps: int, decode: bool) -> Run:
        self._window = []
        out = self.pipe(prompt, num_inference_steps=steps, seed=seed, output_type="np" if decode else "latent",
                        **self.call_kwargs)
        seconds = self._window[1] - self._window[0]
        return Run(seconds, latents=None, frames=out) if decode else Run(seconds, latents=out)


def baseline_runner(checkpoint: str, manifest, device: str):
    if manifest.data["model"]["family"] == "opensora":
        return OpenSoraReferenceRunner(checkpoint, manifest, device)
    return DiffusersRunner(checkpoint, manifest, device)


class RuntimeRunner:
    def __init__(self, runtime, policy: str):
        self.runtime, self.policy = runtime, policy

    def __call__(self, prompt: str, seed: int, steps: int, decode: bool) -> Run:
        r = self.runtime.generate(prompt, seed=seed, num_inference_steps=steps, policy=self.policy, decode=decode)
        return Run(r.stats["denoise_seconds"], latents=r.latents, frames=r.frames, stats=r.stats)


# ------------------------------------------------------------------ report
def fmt_db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def json_float(value: float):
    return "inf" if math.isinf(value) else value


def table(rows: list[dict]) -> str:
    head = ["config", "denoise s (median)", "min-max s", "ms/step", "speedup", "layers skipped",
            "PSNR vs none (dB)", "PSNR vs diffusers (dB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        name = r["config"] + ("" if r["deterministic"] else " (non-deterministic!)")
        lines.append("| " + " | ".join([
            name, f"{r['median_seconds']:.3f}",
            f"{min(r['samples_seconds']):.3f}-{max(r['samples_seconds']):.3f}", f"{1000 * r['median_seconds'] / r['steps']:.1f}",
            f"{r['speedup']:.2f}x", f"{100 * r['skipped_share']:.1f}%",
            fmt_db(r["psnr_vs_none"]), fmt_db(r["psnr_vs_diffusers"]),
        ]) + " |")
    return "\n".join(lines)


def markdown_section(report: dict) -> str:
    c, m = report["config"], report["machine"]
    return (
        f"### {report['date']}: {c['model']}, {c['steps']} steps, {c['repeats']} repeats, {m['device']}\n\n"
        f"`{report['command']}`\n\n"
        f"{m['platform']}, {m['cpus_usable']} CPUs usable; torch {m['torch']} ({m['torch_num_threads']} threads), "
        f"onnxruntime {m['onnxruntime']}, diffusers {m['diffusers']}; load average {m['loadavg_start']} before, "
        f"{m['loadavg_end']} after. Prompt {c['prompt']!r}, seed {c['seed']}.\n\n"
        f"{report['table']}\n\n"
    )


# ------------------------------------------------------------------ the benchmark
def run_benchmark(args, command: str) -> dict:
    if args.steps < 1 or args.repeats < 1:
        raise ConfigError("--steps and --repeats must be >= 1")
    engines = ensure_engines(args.engines)

    from runtime import Runtime
    from runtime.manifest import load_manifest

    manifest = load_manifest(engines)
    checkpoint = args.checkpoint or manifest.data["model"]["source"]["checkpoint"]
    machine = machine_info(args.device)
    warn_if_busy(machine)
    log(f"{manifest.data['name']} from {checkpoint}: {args.steps} steps, 1 warm-up + {args.repeats} interleaved runs "
        f"per configuration; torch {machine['torch_num_threads']} threads, {machine['cpus_usable']} CPUs")

    runners = {BASELINE: baseline_runner(checkpoint, manifest, args.device)}
    configs = [Config(BASELINE)]
    runtimes = {}
    for backend in args.backends:
        kwargs = {"checkpoint": args.checkpoint} if backend == "torch" and args.checkpoint else {}
        runtimes[backend] = Runtime.load(engines, backend=backend, device=args.device, **kwargs)
        for policy in args.policies:
            name = f"{backend}/{policy}"
            configs.append(Config(name, backend, policy))
            runners[name] = RuntimeRunner(runtimes[backend], policy)
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

    machine["loadavg_end"] = loadavg()  # recorded, not judged: this process's own runs raise it
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
    shapes = manifest.data["shapes"]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {
            "model": manifest.data["name"], "engines": str(engines), "checkpoint": str(checkpoint),
            "steps": args.steps, "repeats": args.repeats, "prompt": args.prompt, "seed": args.seed,
            "backends": args.backends, "policies": args.policies,
            "frames": shapes["frames"]["default"], "height": shapes["height"]["default"],
            "width": shapes["width"]["default"], "guidance_scale": manifest.pipeline["default_guidance"],
            "timing": "denoising loop only (see tools/benchmark.py docstring); median over interleaved repeats",
        },
        "machine": machine,
        "results": results,
    }
    report["table"] = table(results)
    return report


def write_json(report: dict, path: Path) -> None:
    data = dict(report)
    data["results"] = [{k: json_float(v) if isinstance(v, float) else v for k, v in r.items()} for r in report["results"]]
    common.write_json(data, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.report_main("benchmark", args, argv, run_benchmark, write_json, markdown_section)


if __name__ == "__main__":
    sys.exit(main())
