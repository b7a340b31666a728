"""What the measuring tools (benchmark, compare, gpu_check) share: the engines folder and the
machine, the reference pipelines and the runtime behind one call signature, timed around the
same denoising-loop window (tools/benchmark.py's docstring says why this window), and peak memory.
torch and diffusers are imported where they are used, so importing this module stays cheap."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtime.errors import ManifestError

DEFAULT_ENGINES = Path("engines/latte-tiny")
DEFAULT_PROMPT = "a red panda eating bamboo in a sunny forest"
BASELINE = "diffusers"  # the reference pipeline's row, also for Open-Sora (whose reference is our eager pipeline)


# ------------------------------------------------------------------ engines and machine
def add_engines_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--engines", type=Path, default=DEFAULT_ENGINES,
                    help=f"engines folder (default {DEFAULT_ENGINES}; exported from the tiny preset if missing)")


def ensure_engines(path: Path, log: Callable[[str], None]) -> Path:
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


def warn_if_busy(machine: dict, log: Callable[[str], None]) -> None:
    load = machine["loadavg_start"]
    if load and load[0] > 0.5 * machine["cpus_usable"]:
        log(f"warning: load average {load[0]:.2f} on {machine['cpus_usable']} CPUs before the runs: other processes "
            "compete for the cores and the timings will be noisy; rerun on a quiet machine")


def machine_summary(m: dict, ort_threads: bool = False) -> str:
    """``machine_info`` (with ``loadavg_end``) as a sentence; ``ort_threads``: say ONNX Runtime's threads too
    (for a tool that can set them)."""
    ort = f"onnxruntime {m['onnxruntime']}" + (f" (intra-op threads {m['onnxruntime_intra_op_threads']})"
                                               if ort_threads else "")
    return (f"{m['platform']}, {m['cpus_usable']} CPUs usable; torch {m['torch']} ({m['torch_num_threads']} threads), "
            f"{ort}, diffusers {m['diffusers']}; load average {m['loadavg_start']} before, {m['loadavg_end']} after.")


# ------------------------------------------------------------------ runners
def manifest_defaults(manifest) -> dict:
    """The frames, size and guidance scale the runtime generates with when the caller passes none."""
    shapes = manifest.shapes
    return {"frames": shapes["frames"]["default"], "height": shapes["height"]["default"],
            "width": shapes["width"]["default"], "guidance_scale": manifest.pipeline["default_guidance"]}


def baseline_kwargs(manifest) -> tuple[str, dict]:
    """The reference pipeline class and the call arguments that match the runtime's defaults."""
    p, d = manifest.pipeline, manifest_defaults(manifest)
    size = dict(height=d["height"], width=d["width"], negative_prompt=p["default_negative_prompt"],
                guidance_scale=d["guidance_scale"])
    family = manifest.family
    if family == "latte":
        return "LattePipeline", dict(size, video_length=d["frames"], clean_caption=False,
                                     mask_feature=p.get("mask_text", True),
                                     decode_chunk_size=p.get("decode_chunk_size", 14))
    if family == "cogvideox":
        return "CogVideoXPipeline", dict(size, num_frames=d["frames"], max_sequence_length=p["max_text_length"],
                                         use_dynamic_cfg=p.get("use_dynamic_cfg", False))
    if family == "wan":
        extra = {"guidance_scale_2": p.get("default_guidance_2") or d["guidance_scale"]} if manifest.experts else {}
        return "WanPipeline", dict(size, num_frames=d["frames"], max_sequence_length=p["max_text_length"], **extra)
    raise ManifestError(f"the benchmark has no diffusers baseline for {family!r} models")


@dataclass
class Run:
    seconds: float
    latents: "object"  # torch.Tensor (1, C, F, h, w)
    frames: "object" = None  # numpy uint8 (F, H, W, 3) when decoded
    stats: dict = field(default_factory=dict)


class Stopwatch:
    """The seconds of every block run in ``window()``, between ``perf_counter`` stamps taken after a
    device sync on CUDA (kernels run asynchronously: unsynced stamps would time their launch)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.seconds: list[float] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def window(self):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds.append(time.perf_counter() - start)


class DiffusersRunner(Stopwatch):
    """A diffusers pipeline (``LattePipeline``, ``CogVideoXPipeline``, ``WanPipeline``) eager, called with
    ``call_kwargs`` and timed around its denoising loop: both open ``with self.progress_bar(total=...)`` around exactly
    that loop, so the runner gives the pipeline a progress bar that runs ``window()`` (tqdm disabled)."""

    def __init__(self, pipe, call_kwargs: dict, device: str):
        super().__init__(device)
        self.pipe, self.call_kwargs = pipe.to(self.device), call_kwargs
        self.pipe.set_progress_bar_config(disable=True)
        original = self.pipe.progress_bar

        @contextlib.contextmanager
        def timed_progress_bar(*args, **kwargs):
            with original(*args, **kwargs) as bar, self.window():
                yield bar

        self.pipe.progress_bar = timed_progress_bar

    @classmethod
    def load(cls, checkpoint: str, manifest, device: str) -> "DiffusersRunner":
        """The checkpoint's pipeline, called with the inputs the runtime derives from the manifest."""
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" would interleave with ours
        pipeline_class, call_kwargs = baseline_kwargs(manifest)
        try:
            pipe = getattr(diffusers, pipeline_class).from_pretrained(checkpoint)
        except Exception as exc:  # noqa: BLE001
            raise ManifestError(
                f"diffusers could not load the checkpoint {checkpoint!r} ({exc}); pass its folder with --checkpoint"
            ) from exc
        return cls(pipe, call_kwargs, device)

    def __call__(self, prompt: str, seed: int, steps: int, decode: bool) -> Run:
        import numpy as np

        self.seconds = []
        out = self.pipe(
            prompt, num_inference_steps=steps, generator=self.torch.Generator("cpu").manual_seed(seed),
            output_type="np" if decode else "latent", **self.call_kwargs,
        ).frames
        if len(self.seconds) != 1:
            raise RuntimeError(
                f"{type(self.pipe).__name__} opened its progress bar {len(self.seconds)} times in one call (expected "
                "once, around the denoising loop): this diffusers version needs a new timing hook in tools/harness.py"
            )
        if decode:
            frames = (np.asarray(out[0]) * 255).round().astype(np.uint8)  # (F, H, W, 3)
            return Run(self.seconds[0], latents=None, frames=frames)
        return Run(self.seconds[0], latents=out)


class OpenSoraReferenceRunner(Stopwatch):
    """Open-Sora 1.2 has no diffusers pipeline: the baseline is our eager reference
    (``dit.opensora_pipeline``; the runtime's oracle), timed around its
    rectified-flow loop (``RFlowSampler.sample``), the same window as the runtime's."""

    def __init__(self, checkpoint: str, manifest, device: str):
        import dataclasses

        from dit.opensora_pipeline import OpenSoraPipeline
        from dit.rflow import RFlowSampler

        super().__init__(device)
        self.pipe = OpenSoraPipeline.from_pretrained(checkpoint).to(self.device)
        runner = self

        @dataclasses.dataclass(frozen=True)
        class TimedRFlow(RFlowSampler):  # dataclasses.replace in the pipeline keeps the subclass
            def sample(self, model_fn, z, timesteps):
                with runner.window():
                    return super().sample(model_fn, z, timesteps)

        self.pipe.scheduler = TimedRFlow(**dataclasses.asdict(self.pipe.scheduler))
        d = manifest_defaults(manifest)
        self.call_kwargs = dict(num_frames=d["frames"], height=d["height"], width=d["width"],
                                guidance_scale=d["guidance_scale"])

    def __call__(self, prompt: str, seed: int, steps: int, decode: bool) -> Run:
        self.seconds = []
        out = self.pipe(prompt, num_inference_steps=steps, seed=seed, output_type="np" if decode else "latent",
                        **self.call_kwargs)
        return Run(self.seconds[0], latents=None, frames=out) if decode else Run(self.seconds[0], latents=out)


def baseline_runner(checkpoint: str, manifest, device: str):
    if manifest.family == "opensora":
        return OpenSoraReferenceRunner(checkpoint, manifest, device)
    return DiffusersRunner.load(checkpoint, manifest, device)


class RuntimeRunner:
    """The runtime with one policy: a name, or a config from ``Runtime.make_policy``."""

    def __init__(self, runtime, policy):
        self.runtime, self.policy = runtime, policy

    def __call__(self, prompt: str, seed: int, steps: int, decode: bool) -> Run:
        r = self.runtime.generate(prompt, seed=seed, num_inference_steps=steps, policy=self.policy, decode=decode)
        return Run(r.stats["denoise_seconds"], latents=r.latents, frames=r.frames, stats=r.stats)


# ------------------------------------------------------------------ memory
class PeakMemory:
    """Peak memory of one run, MiB. CUDA: ``torch.cuda.max_memory_allocated`` (all that torch holds on
    the GPU, so every model loaded in the process: compare differences between rows). CPU on Linux:
    the peak resident set during the run (VmHWM, reset before it by writing 5 to /proc/self/clear_refs)
    minus the resident set before it. Elsewhere: the growth of ``ru_maxrss``, the process's lifetime
    peak, which is 0 once an earlier run went higher."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.mib: float | None = None
        self.mode = "cuda" if self.device.type == "cuda" else "hwm" if self._reset_hwm() else "maxrss"
        self.method = {
            "cuda": "torch.cuda.max_memory_allocated during the run (every loaded model's weights included)",
            "hwm": "peak RSS during the run minus RSS before it (Linux VmHWM, reset per run)",
            "maxrss": "growth of the process's peak RSS (ru_maxrss; 0 once an earlier run peaked higher)",
        }[self.mode]

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise OSError(f"no {key} in /proc/self/status")

    @staticmethod
    def _maxrss_kib() -> float:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / 1024 if sys.platform == "darwin" else r  # bytes on macOS, KiB elsewhere

    def __enter__(self):
        if self.mode == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)
        elif self.mode == "hwm":
            self._reset_hwm()
            self._before = self._status_kib("VmRSS")
        else:
            self._before = self._maxrss_kib()
        return self

    def __exit__(self, *exc):
        if self.mode == "cuda":
            self.mib = self.torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.mode == "hwm":
            self.mib = max(0, self._status_kib("VmHWM") - self._before) / 1024
        else:
            self.mib = max(0.0, self._maxrss_kib() - self._before) / 1024
