"""This runtime against diffusers' own caches: speed, fidelity, adherence and memory, side by side in one process.

    python -m tools.compare --json /tmp/cmp.json --plot /tmp/cmp.png --markdown BENCHMARKS.md
    python -m tools.compare --steps 6 --repeats 1 --prompts 1 --methods diffusers,pab,foresight --backends onnxruntime
    python -m tools.compare --size latte --device cuda --backends torch    # GPU: a Latte-1-sized model, random weights

Configurations, by family (``--methods`` picks families; ``diffusers`` is always run):
- ``diffusers``: the model's diffusers pipeline (``LattePipeline`` for Latte, loaded and timed by
  tools/harness.py's ``DiffusersRunner``), eager, full compute. The speed baseline, and the
  reference of every PSNR/SSIM: the frames it makes for the same prompt and seed.
- diffusers' built-in caches on that pipeline, enabled with ``transformer.enable_cache(config)``,
  each at the settings in ``CACHE_SETTINGS``: ``pab`` (Pyramid Attention Broadcast), ``fastercache``,
  ``fbc`` (First Block Cache), ``taylorseer``, ``magcache``. MagCache needs per-model magnitude
  ratios: the harness first runs MagCache's own calibration (``calibrate=True``, every block
  computed) on the first prompt and seed at the same step count, and uses the ratios it prints.
  TaylorSeer gets attention patterns that allow numbered attentions (``TAYLORSEER_ATTENTION``):
  its defaults match no module of Latte and would leave it computing everything.
- ``hooks``: Foresight on that same eager pipeline through ``runtime.apply_foresight``
  (``diffusers+foresight@t`` at the runtime rows' thresholds, ``diffusers+static``): the like-for-like
  comparison of the algorithm with diffusers' caches (same execution, only the caching differs).
  Not applicable to Open-Sora (no diffusers pipeline).
- this runtime on each of ``--backends`` with the policies ``none``, ``static`` (its defaults) and
  ``foresight`` at each of ``--thresholds`` (default: the manifest's threshold x0.5, x1, x2; its
  other Foresight values from the manifest). Named ``backend/policy[@threshold]``.

Wiring the caches into a pipeline written before them (LattePipeline calls its transformer
neither inside ``cache_context`` nor with a timestep the hooks can read): ``StepClock`` adds, with
torch forward hooks on the transformer, a ``cache_context("cfg")`` around every call (Latte runs
both CFG branches in one batched call) and records the call's ``timestep`` argument, which it returns
as PAB's and FasterCache's ``current_timestep_callback``. Every generation enables the cache afresh
(new hooks, new state) and disables it after, so no state crosses generations or configurations.
A cache that raises on the model, or that this diffusers version lacks, is a row saying so, with
the reason; it is not timed. On Latte (diffusers 0.42.1) PAB, FasterCache and TaylorSeer run; First
Block Cache and MagCache (its calibration too) raise at the first step: they take
``transformer_blocks.0`` and ``temporal_transformer_blocks[-1]`` as the two ends of one stack of
blocks, while Latte alternates spatial and temporal blocks with a change of layout between them.
diffusers' log warnings go to the JSON, per configuration.

Protocol: a quality pass, then timed rounds.
- Quality (one run per configuration and prompt, ``--prompts`` held-out prompts of
  tools/synthetic.py, prompt i with seed ``--seed + i``; it is also every configuration's warm-up):
  PSNR and SSIM of the decoded frames against diffusers' full-compute frames of the same prompt
  and seed (tools/metrics.py), adherence read from the pixels (tools/evaluate.py ``score_clip``:
  is the object the prompt's colour, does it move the prompt's way), share of calls skipped.
  Means over the prompts; the mean PSNR leaves out prompts whose frames equal the reference
  (infinite PSNR) and is "inf" when all do.
- Timing (``--repeats`` rounds; round r runs every configuration once on prompt r mod N, the
  order rotated by one each round, so machine drift hits all configurations alike): medians of
  the denoising seconds (the denoising loop only, the window of tools/benchmark.py's docstring;
  the runtime's own ``denoise_seconds``) and of the end-to-end seconds (wall clock of the whole
  call: text encoding, loop, VAE decode, frames to uint8), speedups over diffusers' medians, and
  the largest peak memory (harness's ``PeakMemory``: CUDA ``max_memory_allocated``; on CPU the process's
  peak resident set during the run over its resident set before it).

Skipped share, by family: ``layers`` (runtime: layer calls skipped, its own stats), ``blocks``
(diffusers baseline, FBC, MagCache: transformer-block calls that ran none of their submodules),
``attn`` (PAB, FasterCache, TaylorSeer: attention-module calls that ran none of their
projections); counted with torch hooks during the quality pass only. FasterCache also skips the
unconditional CFG branch at some steps (the notes give in how many transformer calls).

Thread counts are torch's and ONNX Runtime's defaults, recorded; ``--threads N`` sets both (use 1 on
a machine shared with another job: pools spinning on busy cores slow runs many times over).
Cost of the default run (50 steps, 3 repeats, 4 prompts: 20 runnable configurations, 7 rounds) on
the shipped tiny Latte: about 3 minutes on 2 CPU cores (a round took ~21 s with ``--threads 1``
beside another job), plus ~20 s to export the engines if missing.

The Pareto front (of PSNR and denoising speedup, higher is better on both) is marked in the
table and drawn by ``--plot``. In the JSON, infinite values are the string "inf".
Adherence is meaningful only for a model trained on tools/synthetic.py (the shipped preset).

``--size`` other than ``shipped`` runs one of tools/gpu_check.py's random-weight models instead
(``latte``: Latte-1's transformer at 16x256x256, bf16 on CUDA): built in memory, the runtime over
its torch backend only (``gpu_check.in_memory_runtime``), diffusers' pipeline over the same weights.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import logging
import math
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from foresight import ConfigError
from runtime.backends import BACKENDS
from runtime.errors import BackendError
from tools import common, evaluate, harness
from tools.common import POLICIES, csv_choices, fmt
from tools.evaluate import PROMPT_SEED
from tools.harness import BASELINE
from tools.metrics import psnr, ssim
from tools.synthetic import held_out_prompts

CACHES = ("pab", "fastercache", "fbc", "taylorseer", "magcache")
HOOKS = "hooks"  # apply_foresight on the baseline's own eager pipeline
METHODS = (BASELINE, *CACHES, HOOKS, *POLICIES)
SIZES = ("shipped", "latte", "tiny")  # the latter two: tools/gpu_check.py's SIZES
THRESHOLD_FACTORS = (0.5, 1.0, 2.0)

# diffusers' config class per cache family, and 2-3 settings each: a label and the config's arguments.
CACHE_CLASSES = {"pab": "PyramidAttentionBroadcastConfig", "fastercache": "FasterCacheConfig",
                 "fbc": "FirstBlockCacheConfig", "taylorseer": "TaylorSeerCacheConfig", "magcache": "MagCacheConfig"}
CACHE_SETTINGS: dict[str, list[tuple[str, dict]]] = {
    # Attention broadcast every N-th call within timesteps (100, 800) (diffusers' default range).
    "pab": [("s2", dict(spatial_attention_block_skip_range=2)),
            ("s2-t4-c6", dict(spatial_attention_block_skip_range=2, temporal_attention_block_skip_range=4,
                              cross_attention_block_skip_range=6)),
            ("s4-t6-c8", dict(spatial_attention_block_skip_range=4, temporal_attention_block_skip_range=6,
                              cross_attention_block_skip_range=8))],
    # Spatial (and temporal) attention reused every N-th call, unconditional branch computed every u-th call.
    "fastercache": [("s2-u5", dict(spatial_attention_block_skip_range=2, unconditional_batch_skip_range=5)),
                    ("s2-t2-u5", dict(spatial_attention_block_skip_range=2, temporal_attention_block_skip_range=2,
                                      unconditional_batch_skip_range=5)),
                    ("s3-t3-u3", dict(spatial_attention_block_skip_range=3, temporal_attention_block_skip_range=3,
                                      unconditional_batch_skip_range=3))],
    # Skip all blocks after the first when its residual changed by less than the threshold (relative).
    "fbc": [("t0.05", dict(threshold=0.05)), ("t0.1", dict(threshold=0.1)), ("t0.2", dict(threshold=0.2))],
    # Attention outputs computed every cache_interval-th step after 3 full ones, Taylor-extrapolated between.
    "taylorseer": [("i2", dict(cache_interval=2)), ("i4", dict(cache_interval=4)),
                   ("i4-o2", dict(cache_interval=4, max_order=2))],
    # Skip the stack while the accumulated magnitude-ratio error stays under the threshold (max 3 steps).
    "magcache": [("t0.06", dict(threshold=0.06)), ("t0.12", dict(threshold=0.12)), ("t0.24", dict(threshold=0.24))],
}
# TaylorSeer's default patterns ("^transformer_blocks.*attn", matched with re.fullmatch) end at "attn", so
# they match no module of a model whose attentions are numbered (Latte's attn1/attn2): by default it would
# hook nothing. These are the same patterns with the number allowed.
TAYLORSEER_ATTENTION = [r"^(?:blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)"
                        r"\.\d+\.attn\d*$"]
SKIP_UNIT = {BASELINE: "blocks", "fbc": "blocks", "magcache": "blocks", "pab": "attn", "fastercache": "attn",
             "taylorseer": "attn", HOOKS: "layers", **{p: "layers" for p in POLICIES}}
# Warnings every use of a cache gives, whatever the model: in the JSON, not in the table's notes.
BENIGN_WARNINGS = ("purely experimental feature",)
MARKERS = {BASELINE: "*", "pab": "s", "fastercache": "D", "fbc": "^", "taylorseer": "v", "magcache": "P", HOOKS: "d",
           "none": "o", "static": "X", "foresight": "h"}


log = common.logger("compare")


# ------------------------------------------------------------------ configurations
@dataclass
class Sample:
    frames: "object"  # numpy uint8 (F, H, W, 3)
    denoise_seconds: float
    e2e_seconds: float
    skipped: dict = field(default_factory=dict)  # counts for the skipped share


@dataclass
class Config:
    name: str
    method: str  # a METHODS family
    params: dict
    run: Callable[..., Sample] | None = None  # (prompt, seed, count: bool) -> Sample
    error: str | None = None  # why it did not run; None: it ran
    rows: list[dict] = field(default_factory=list)  # quality pass, one per prompt
    denoise: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    memory: list[float | None] = field(default_factory=list)
    warnings: dict[str, None] = field(default_factory=dict)  # diffusers' log warnings, unique, in order


class StepClock:
    """What a pipeline does not give diffusers' cache hooks, added with torch forward hooks on the
    transformer (they fire outside any diffusers hook on the same module):
    - with ``open_context`` (LattePipeline, which has none of its own), a ``cache_context("cfg")``
      around each call (FirstBlockCache, MagCache and TaylorSeer keep their state per context; Latte
      runs both CFG branches in one batched call, hence one context). CogVideoXPipeline
      (``"cond_uncond"``) and WanPipeline (``"cond"`` and ``"uncond"``, one per CFG pass) open their own,
      which are kept;
    - the call's ``timestep`` argument, returned by calling the clock: PAB's and FasterCache's
      ``current_timestep_callback``.
    """

    def __init__(self, open_context: bool = True):
        self.open_context = open_context
        self.timestep: float | None = None
        self._context = None
        self._handles = []

    def __call__(self) -> float | None:
        return self.timestep

    def attach(self, transformer) -> None:
        self._handles = [transformer.register_forward_pre_hook(self._before, with_kwargs=True),
                         transformer.register_forward_hook(self._after, with_kwargs=True, always_call=True)]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.timestep = [], None

    def _before(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.timestep = float(t.flatten()[0]) if hasattr(t, "flatten") else t
        if self.open_context:
            self._context = module.cache_context("cfg")
            self._context.__enter__()

    def _after(self, module, args, kwargs, output):
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


@contextlib.contextmanager
def cache_enabled(transformer, config, clock: StepClock):
    """``config`` enabled on ``transformer`` for one generation: fresh hooks, so fresh state."""
    clock.attach(transformer)
    try:
        transformer.enable_cache(config)
        yield
    finally:
        if transformer.is_cache_enabled:
            transformer.disable_cache()
        clock.detach()


class CallCounter:
    """Counts, with torch hooks, the calls of the transformer's blocks (children of its ModuleLists)
    and attention modules, and those that ran none of their direct children (skipped by a cache:
    a skipped module returns without calling into its submodules); and the transformer calls
    whose batch was smaller than the largest seen (FasterCache's skipped unconditional branch)."""

    def __init__(self, transformer):
        import torch
        from diffusers.models import attention, attention_processor

        self.transformer = transformer
        blocks = [b for m in transformer.children() if isinstance(m, torch.nn.ModuleList) for b in m]
        kinds = tuple(k for k in (attention_processor.Attention, getattr(attention, "AttentionModuleMixin", None)) if k)
        attentions = [m for m in transformer.modules() if isinstance(m, kinds)]
        self.groups = {"blocks": blocks, "attn": attentions}
        self.calls, self.ran = Counter(), Counter()
        self.batches: list[int] = []
        self._active: dict[int, bool] = {}
        self._handles = []

    def __enter__(self):
        def enter(module, args):
            self._active[id(module)] = False

        def child(parent, module, args):
            self._active[id(parent)] = True

        def leave(kind, module, args, output):
            self.calls[kind] += 1
            self.ran[kind] += self._active.pop(id(module), False)

        def batch(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            self.batches.append(int(x.shape[0]))

        h = self._handles
        h.append(self.transformer.register_forward_pre_hook(batch, with_kwargs=True))
        for kind, modules in self.groups.items():
            for m in modules:
                h += [m.register_forward_pre_hook(enter), m.register_forward_hook(partial(leave, kind))]
                h += [c.register_forward_pre_hook(partial(child, m)) for c in m.children()]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def summary(self) -> dict:
        full = max(self.batches, default=0)
        return {
            **{f"{k}_calls": self.calls[k] for k in self.groups},
            **{f"{k}_skipped": self.calls[k] - self.ran[k] for k in self.groups},
            "transformer_calls": len(self.batches),
            "uncond_skipped_calls": sum(b < full for b in self.batches),
        }


class DiffusersWarnings(logging.Handler):
    """Collects diffusers' log warnings into ``into`` instead of printing them (FasterCache's
    experimental-feature notice would repeat on every enable_cache)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.into: dict[str, None] | None = None

    def emit(self, record):
        message = record.getMessage().strip()
        if self.into is None:
            log(f"diffusers: {message}")
        else:
            self.into.setdefault(message.splitlines()[0][:200])

    @contextlib.contextmanager
    def installed(self):
        import diffusers

        diffusers.utils.logging.disable_default_handler()
        logging.getLogger("diffusers").addHandler(self)
        try:
            yield self
        finally:
            logging.getLogger("diffusers").removeHandler(self)
            diffusers.utils.logging.enable_default_handler()


def diffusers_run(runner, steps: int, clock: StepClock, cache=None) -> Callable[..., Sample]:
    """One generation through ``runner`` (a tools/harness.py DiffusersRunner), with ``cache`` enabled."""
    def run(prompt: str, seed: int, count: bool = False) -> Sample:
        transformer = runner.pipe.transformer
        with contextlib.ExitStack() as stack:
            if cache is not None:
                stack.enter_context(cache_enabled(transformer, cache, clock))
            counter = stack.enter_context(CallCounter(transformer)) if count else None
            t0 = time.perf_counter()
            out = runner(prompt, seed, steps, decode=True)
            e2e = time.perf_counter() - t0
        return Sample(out.frames, out.seconds, e2e, counter.summary() if counter else {})
    return run


def hooked_run(runner, steps: int, policy) -> Callable[..., Sample]:
    """One generation through ``runner``'s own pipeline with ``apply_foresight(pipe, policy)`` (applied for
    the call, removed after)."""
    from runtime import apply_foresight

    def run(prompt: str, seed: int, count: bool = False) -> Sample:
        with apply_foresight(runner.pipe, policy) as handle:
            t0 = time.perf_counter()
            out = runner(prompt, seed, steps, decode=True)
            e2e = time.perf_counter() - t0
            stats = handle.stats
        return Sample(out.frames, out.seconds, e2e,
                      {k: stats[k] for k in ("layer_calls", "layer_calls_skipped", "skipped_share")})
    return run


def hooks_configs(runner, manifest, steps: int, thresholds: list[float] | None) -> list[Config]:
    """``diffusers+foresight@t`` (the thresholds the runtime rows use) and ``diffusers+static``: Foresight
    through apply_foresight on the baseline's eager pipeline, so only the caching differs from the caches'."""
    from foresight import make_config

    foresight = {**manifest.foresight_defaults}
    rows = [(f"diffusers+foresight@{t:g}", make_config("foresight", **{**foresight, "threshold": t}))
            for t in thresholds or [foresight.get("threshold", 0.5) * f for f in THRESHOLD_FACTORS]]
    rows.append(("diffusers+static", make_config("static")))
    if isinstance(runner, harness.OpenSoraReferenceRunner):
        reason = "not applicable: Open-Sora 1.2 has no diffusers pipeline to apply Foresight to"
        return [Config(name, HOOKS, policy.to_dict(), error=reason) for name, policy in rows]
    return [Config(name, HOOKS, policy.to_dict(), hooked_run(runner, steps, policy)) for name, policy in rows]


def runtime_run(runner, steps: int) -> Callable[..., Sample]:
    """One generation through ``runner`` (a tools/harness.py RuntimeRunner)."""
    def run(prompt: str, seed: int, count: bool = False) -> Sample:
        t0 = time.perf_counter()
        out = runner(prompt, seed, steps, decode=True)
        e2e = time.perf_counter() - t0
        return Sample(out.frames, out.seconds, e2e,
                      {k: out.stats[k] for k in ("layer_calls", "layer_calls_skipped", "skipped_share")})
    return run


def calibrate_magcache(runner, steps: int, clock: StepClock, prompt: str, seed: int) -> list[float]:
    """MagCache's own calibration (every block computed; it prints the per-step ratios when the
    last step ends), on one prompt at the run's step count; the ratios parsed from its printout."""
    import diffusers

    out = io.StringIO()
    config = diffusers.MagCacheConfig(calibrate=True, num_inference_steps=steps)
    with cache_enabled(runner.pipe.transformer, config, clock), contextlib.redirect_stdout(out):
        runner(prompt, seed, steps, decode=False)
    found = re.search(r"Calibration Complete.*?(\[[^\]]*\])", out.getvalue(), re.S)
    if not found:
        raise RuntimeError("MagCache's calibration printed no ratios (this diffusers version changed its output)")
    return [float(x) for x in ast.literal_eval(found.group(1))]


def cache_configs(methods, runner, steps: int, clock: StepClock, dtype, prompt: str, seed: int) -> list[Config]:
    """One Config per selected cache family and setting; those that cannot be built carry the reason."""
    import diffusers

    transformer = runner.pipe.transformer
    configs = []
    for method in (m for m in CACHES if m in methods):
        cls = getattr(diffusers, CACHE_CLASSES[method], None)
        extra, reason = {}, None
        if isinstance(runner, harness.OpenSoraReferenceRunner):
            reason = ("not applicable: Open-Sora 1.2 has no diffusers pipeline or transformer, so diffusers' caches "
                      "do not exist for it (the baseline is this project's eager reference pipeline)")
        elif cls is None:
            reason = f"not applicable: diffusers {diffusers.__version__} has no {CACHE_CLASSES[method]}"
        elif not hasattr(transformer, "enable_cache"):
            reason = f"not applicable: {type(transformer).__name__} has no enable_cache (no CacheMixin)"
        elif method == "pab":
            extra = {"current_timestep_callback": clock}
        elif method == "fastercache":
            extra = {"current_timestep_callback": clock, "attention_weight_callback": fastercache_weight}
        elif method == "taylorseer":
            extra = {"cache_identifiers": TAYLORSEER_ATTENTION, "taylor_factors_dtype": dtype}
        elif method == "magcache":
            log(f"calibrating MagCache's magnitude ratios on {prompt!r}, seed {seed}, {steps} steps")
            try:
                ratios = calibrate_magcache(runner, steps, clock, prompt, seed)
                extra = {"mag_ratios": ratios, "num_inference_steps": steps}
            except Exception as exc:  # noqa: BLE001 - a cache failing on this model is a result, reported
                reason = "failed in calibration: " + describe_failure(exc, transformer)
        for label, kwargs in CACHE_SETTINGS[method]:
            params = {**kwargs, **{k: v if isinstance(v, (list, float, int)) else str(v) for k, v in extra.items()
                                   if not callable(v)}}
            c = Config(f"{method}/{label}", method, params, error=reason)
            if reason is None:
                c.run = diffusers_run(runner, steps, clock, cls(**kwargs, **extra))
            configs.append(c)
    return configs


def fastercache_weight(module) -> float:
    """FasterCache's attention weight: its own default, given explicitly (it warns when it has to pick it)."""
    return 0.5


def describe_failure(exc: Exception, transformer) -> str:
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    names = {n for n, _ in transformer.named_children()}
    if {"transformer_blocks", "temporal_transformer_blocks"} <= names and "size of tensor" in text:
        text += (" (the hook treats transformer_blocks.0 and temporal_transformer_blocks[-1] as the first and "
                 "last blocks of one stack, but this model alternates spatial and temporal blocks with reshapes "
                 "between them, so their hidden states differ in layout)")
    return text


def runtime_configs(policies, backends, load, steps: int, thresholds: list[float] | None) -> list[Config]:
    """One Config per backend and policy (foresight once per threshold); ``load(backend)`` makes a Runtime."""
    configs = []
    for backend in backends if policies else []:
        try:
            rt = load(backend)
        except BackendError as exc:
            configs += [Config(f"{backend}/{p}", p, {}, error=f"not available: {exc}") for p in policies]
            continue
        for policy in policies:
            default = rt.make_policy(policy)
            for t in (thresholds or [default.threshold * f for f in THRESHOLD_FACTORS]) if policy == "foresight" \
                    else [None]:
                cfg = rt.make_policy(policy, threshold=t)  # None: the policy's own values
                configs.append(Config(f"{backend}/{policy}" + ("" if t is None else f"@{t:g}"), policy,
                                      cfg.to_dict(), runtime_run(harness.RuntimeRunner(rt, cfg), steps)))
    return configs


# ------------------------------------------------------------------ metrics and aggregation
def quality_row(sample: Sample, reference, prompt: str, seed: int, unit: str) -> dict:
    """One prompt's numbers for one configuration: fidelity to ``reference`` frames, adherence, skipped share."""
    s = sample.skipped
    if unit == "layers":
        share = s.get("skipped_share", 0.0)
    else:
        share = s.get(f"{unit}_skipped", 0) / max(1, s.get(f"{unit}_calls", 0))
    score = evaluate.score_clip(sample.frames, prompt)
    return {"prompt": prompt, "seed": seed, "psnr": psnr(sample.frames, reference),
            "ssim": ssim(sample.frames, reference), "color_ok": score["color_ok"],
            "direction_ok": score["direction_ok"], "skipped_share": share, **s}


def aggregate(rows: list[dict]) -> dict:
    """Means over prompts; PSNR over the prompts whose frames differ from the reference ("inf" if none)."""
    return {
        "prompts": len(rows),
        "psnr": evaluate.mean_psnr([r["psnr"] for r in rows]),
        "identical_prompts": sum(math.isinf(r["psnr"]) for r in rows),
        "ssim": statistics.fmean(r["ssim"] for r in rows),
        **evaluate.adherence(rows),
        "skipped_share": statistics.fmean(r["skipped_share"] for r in rows),
        "uncond_skipped_calls": sum(r.get("uncond_skipped_calls", 0) for r in rows),
        "transformer_calls": sum(r.get("transformer_calls", 0) for r in rows),
    }


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names of the points no other point dominates (>= on both axes and > on one; higher is better)."""
    return {a for a, (x, y) in points.items()
            if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for b, (x2, y2) in points.items() if b != a)}


def summarize(configs: list[Config]) -> list[dict]:
    """One result per configuration (failed ones with their reason), speedups over the baseline, Pareto marks."""
    base = next(c for c in configs if c.method == BASELINE)
    base_denoise, base_e2e = statistics.median(base.denoise), statistics.median(base.e2e)
    results = []
    for c in configs:
        r = {"config": c.name, "method": c.method, "params": c.params, "status": "ok" if c.error is None else "failed",
             "reason": c.error, "skipped_unit": SKIP_UNIT[c.method], "diffusers_warnings": list(c.warnings)}
        if c.error is None:
            denoise, e2e = statistics.median(c.denoise), statistics.median(c.e2e)
            memory = [m for m in c.memory if m is not None]
            r.update(aggregate(c.rows), denoise_seconds=denoise, e2e_seconds=e2e,
                     denoise_samples=c.denoise, e2e_samples=c.e2e,
                     speedup_denoise=base_denoise / denoise, speedup_e2e=base_e2e / e2e,
                     peak_memory_mib=max(memory) if memory else None, per_prompt=c.rows)
        results.append(r)
    front = pareto_front({r["config"]: (r["psnr"], r["speedup_denoise"]) for r in results if r["status"] == "ok"})
    for r in results:
        r["pareto"] = r["config"] in front
    return results


# ------------------------------------------------------------------ report
def notes(r: dict) -> str:
    out = []
    if r["status"] == "ok":
        if r["method"] in CACHES and r["identical_prompts"] == r["prompts"]:
            out.append("no effect: frames identical to full compute")
        if 0 < r["identical_prompts"] < r["prompts"]:
            out.append(f"PSNR over {r['prompts'] - r['identical_prompts']} of {r['prompts']} prompts (rest identical)")
        if r["uncond_skipped_calls"]:
            out.append(f"uncond branch skipped in {r['uncond_skipped_calls']} of {r['transformer_calls']} calls")
        warned = [w for w in r["diffusers_warnings"] if not any(b in w for b in BENIGN_WARNINGS)]
        if warned:
            out.append(f"diffusers warned: {warned[0]}" + (f" (+{len(warned) - 1} more in the JSON)"
                                                          if len(warned) > 1 else ""))
    else:
        out.append(r["reason"])
    return "; ".join(out)


HEAD = ["config", "denoise s", "e2e s", "speedup denoise", "speedup e2e", "skipped", "PSNR dB", "SSIM",
        "colour %", "direction %", "peak MiB", "Pareto", "notes"]


def table(results: list[dict]) -> str:
    """Markdown table; consecutive configurations that failed for one reason share a row."""
    rows = []
    i = 0
    while i < len(results):
        r = results[i]
        if r["status"] != "ok":
            j = i
            while j + 1 < len(results) and results[j + 1]["status"] != "ok" and results[j + 1]["reason"] == r["reason"]:
                j += 1
            group = results[i:j + 1]
            names = [x["config"] for x in group]
            if len(group) > 1 and all(x["method"] == r["method"] for x in group):
                name = f"{r['method']} ({', '.join(n.split('/', 1)[1] for n in names)})"
            else:
                name = ", ".join(names)
            rows.append([name] + ["-"] * (len(HEAD) - 2) + [notes(r)])
            i = j + 1
            continue
        rows.append([
            r["config"], fmt(r["denoise_seconds"], ".3f"), fmt(r["e2e_seconds"], ".3f"),
            fmt(r["speedup_denoise"], ".2f") + "x", fmt(r["speedup_e2e"], ".2f") + "x",
            f"{100 * r['skipped_share']:.1f}% {r['skipped_unit']}", fmt(r["psnr"], ".2f"), fmt(r["ssim"], ".4f"),
            fmt(r["color_adherence"], ".0f"), fmt(r["direction_adherence"], ".0f"),
            fmt(r["peak_memory_mib"], ".1f"), "yes" if r["pareto"] else "", notes(r),
        ])
        i += 1
    return common.markdown_table(HEAD, rows, ["---"] + ["---:"] * (len(HEAD) - 3) + ["---", "---"])


def plot(results: list[dict], path: Path, title: str) -> None:
    """Denoising speedup against PSNR vs diffusers full compute, one labelled marker per configuration,
    the Pareto front as a dashed line; identical frames (PSNR inf) on a marked column at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from runtime.outputs import atomic_write

    ok = [r for r in results if r["status"] == "ok"]
    finite = [r["psnr"] for r in ok if math.isfinite(r["psnr"])]
    x_inf = (max(finite) if finite else 40.0) + 5.0
    x = {r["config"]: r["psnr"] if math.isfinite(r["psnr"]) else x_inf for r in ok}
    fig, ax = plt.subplots(figsize=(9, 6))
    for method in dict.fromkeys(r["method"] for r in ok):
        mine = [r for r in ok if r["method"] == method]
        ax.scatter([x[r["config"]] for r in mine], [r["speedup_denoise"] for r in mine], marker=MARKERS[method],
                   s=60, label=method, zorder=3)
    for r in ok:
        ax.annotate(r["config"], (x[r["config"]], r["speedup_denoise"]), xytext=(4, 3), textcoords="offset points",
                    fontsize=7)
    front = sorted((r for r in ok if r["pareto"]), key=lambda r: x[r["config"]])
    ax.plot([x[r["config"]] for r in front], [r["speedup_denoise"] for r in front], "--", color="grey",
            label="Pareto front", zorder=2)
    if len(finite) < len(ok):
        ax.axvline(x_inf, color="lightgrey", linewidth=6, zorder=1)
        ax.annotate("identical\n(PSNR inf)", (x_inf, 1), xycoords=("data", "axes fraction"), xytext=(0, -4),
                    textcoords="offset points", ha="center", va="top", fontsize=7)
    ax.set_xlabel("PSNR vs diffusers full compute (dB, mean over prompts)")
    ax.set_ylabel("denoising speedup vs diffusers (x)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12)  # room for the labels of the rightmost points
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=5)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def markdown_section(report: dict) -> str:
    c, m = report["config"], report["machine"]
    settings = "; ".join(f"`{r['config']}` {r['params']}" for r in report["results"]
                         if r["method"] in CACHES and r["status"] == "ok")
    mag = report.get("magcache_ratios")
    return common.markdown_section(
        report, f"compare, {c['model']}, {c['steps']} steps, {c['repeats']} repeats, {c['prompts']} prompts, "
        f"{m['device']}",
        f"{harness.machine_summary(m, ort_threads=True)} Held-out prompts of tools/synthetic.py (seed {PROMPT_SEED}), "
        f"prompt i with seed {c['seed']} + i. Timing: {c['timing']}. Peak memory: {report['memory_method']}.",
        (f"Cache settings: {settings}.\n\n" if settings else "")
        + (f"MagCache ratios: {mag['source']}.\n\n" if mag else ""))


# ------------------------------------------------------------------ the comparison
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="compare",
        description="Diffusers full compute, diffusers' built-in caches and this runtime's policies side by side: "
        "denoising and end-to-end speedup, share skipped, PSNR/SSIM vs full compute, adherence, peak memory.",
    )
    harness.add_engines_arg(ap)
    ap.add_argument("--size", choices=SIZES, default="shipped",
                    help="shipped: the engines folder's model (default); latte / tiny: tools/gpu_check.py's "
                    "random-weight models built in memory (torch backend only; latte is meant for --device cuda)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds, medians reported (default 3)")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts for the quality pass (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed of prompt 0; prompt i uses seed + i")
    ap.add_argument("--methods", type=csv_choices(METHODS), default=list(METHODS),
                    help=f"comma-separated families from {','.join(METHODS)} (default all; {BASELINE} is always run)")
    ap.add_argument("--backends", type=csv_choices(BACKENDS), default=["onnxruntime", "torch"],
                    help=f"runtime backends, comma-separated from {','.join(BACKENDS)} (default onnxruntime,torch)")
    ap.add_argument("--thresholds", type=_float_list, default=None,
                    help="Foresight thresholds, comma-separated (default: the manifest's x0.5, x1, x2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and ONNX Runtime intra-op threads (default: theirs; 1 on a machine shared with "
                    "another job: spinning thread pools on busy cores slow every run many times over)")
    common.add_report_args(ap, "write the configuration, results and per-prompt rows")
    ap.add_argument("--plot", type=Path, default=None, help="write the PSNR / speedup Pareto plot (PNG)")
    return ap


def _float_list(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: pass comma-separated positive numbers, e.g. 2,4,8")
    return values


def load_model(args, engines: Path | None):
    """(baseline runner, runtime loader, manifest, dtype, whether the clock opens cache contexts) for ``--size``."""
    import torch

    if args.size == "shipped":
        from exporter.families import get_family
        from runtime import Runtime
        from runtime.manifest import load_manifest

        manifest = load_manifest(engines)
        # LattePipeline, CogVideoXPipeline, WanPipeline; Open-Sora: our eager reference (no diffusers pipeline)
        runner = harness.baseline_runner(manifest.source["checkpoint"], manifest, args.device)
        extra = {"threads": args.threads} if args.threads else {}

        def load(backend):
            return Runtime.load(engines, backend=backend, device=args.device,
                                **(extra if backend == "onnxruntime" else {}))
        return runner, load, manifest, torch.float32, get_family(manifest.family).pipeline_class == "LattePipeline"

    from diffusers import LattePipeline

    from tools import gpu_check

    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    components = gpu_check.build(gpu_check.SIZES[args.size], args.device, dtype, args.seed)
    rt = gpu_check.in_memory_runtime(components, args.device, dtype)
    # DiffusersRunner loads a pipeline folder: the same weights, written once to a temporary one.
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        LattePipeline(**{k: components[k] for k in ("tokenizer", "text_encoder", "vae", "transformer",
                                                    "scheduler")}).save_pretrained(tmp)
        runner = harness.DiffusersRunner.load(tmp, rt.manifest, args.device)
    runner.pipe.to(dtype=dtype)

    def load(backend):
        if backend != "torch":
            raise BackendError(f"--size {args.size} is built in memory: only the torch backend runs it")
        return rt
    return runner, load, rt.manifest, dtype, True


def run_compare(args, command: str) -> dict:
    if args.steps < 1 or args.repeats < 1 or args.prompts < 1:
        raise ConfigError("--steps, --repeats and --prompts must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _compare(args, command)
    finally:
        torch.set_num_threads(threads)


def _compare(args, command: str) -> dict:
    import torch

    methods = list(args.methods)
    if BASELINE not in methods:
        log(f"adding {BASELINE!r}: it is the baseline of every speedup and the reference of every PSNR/SSIM")
        methods.insert(0, BASELINE)
    engines = harness.ensure_engines(args.engines, log) if args.size == "shipped" else None
    prompts = held_out_prompts(args.prompts, PROMPT_SEED)
    diffusers_log = DiffusersWarnings()
    with diffusers_log.installed():
        runner, load, manifest, dtype, open_context = load_model(args, engines)
        machine = harness.machine_info(args.device)
        if args.threads:
            machine["onnxruntime_intra_op_threads"] = args.threads
        harness.warn_if_busy(machine, log)
        load_now = machine["loadavg_start"]
        if not args.threads and load_now and load_now[0] > 0.5 * machine["cpus_usable"]:
            log("hint: on a machine shared with another job, --threads 1 keeps thread pools from spinning on busy "
                "cores (which slows runs many times over)")
        clock = StepClock(open_context)
        configs = [Config(BASELINE, BASELINE, {}, diffusers_run(runner, args.steps, clock))]
        configs += cache_configs(methods, runner, args.steps, clock, dtype, prompts[0], args.seed)
        if HOOKS in methods:
            configs += hooks_configs(runner, manifest, args.steps, args.thresholds)
        configs += runtime_configs([p for p in POLICIES if p in methods], args.backends, load, args.steps,
                                   args.thresholds)
        mag = next((c.params["mag_ratios"] for c in configs if c.method == "magcache" and c.error is None), None)
        memory = harness.PeakMemory(args.device)
        active = [c for c in configs if c.error is None]
        log(f"{manifest.name}: {args.steps} steps, {len(active)} configurations ({len(configs) - len(active)} "
            f"not runnable), {len(prompts)} prompts for quality, {args.repeats} timed rounds; torch "
            f"{torch.get_num_threads()} threads")

        for i, prompt in enumerate(prompts):  # quality pass (and warm-up)
            reference = None
            for c in active:
                if c.error is not None:
                    continue
                diffusers_log.into = c.warnings
                try:
                    sample = c.run(prompt, args.seed + i, count=True)
                except Exception as exc:  # noqa: BLE001 - a diffusers cache failing on this model is a result
                    if c.method not in CACHES:
                        raise
                    c.error = "failed: " + describe_failure(exc, runner.pipe.transformer)
                    log(f"{c.name} failed on {prompt!r}: {c.error}")
                    continue
                finally:
                    diffusers_log.into = None
                reference = sample.frames if reference is None else reference  # the baseline runs first
                c.rows.append(quality_row(sample, reference, prompt, args.seed + i, SKIP_UNIT[c.method]))
            log(f"quality [{i + 1}/{len(prompts)}] {prompt!r}: " + ", ".join(
                f"{c.name} {fmt(c.rows[-1]['psnr'], '.1f')} dB" for c in active[1:] if c.error is None and c.rows))

        active = [c for c in active if c.error is None]
        for r in range(args.repeats):  # timed rounds
            i = r % len(prompts)
            for c in common.rotated(active, r):
                diffusers_log.into = c.warnings
                with memory:
                    sample = c.run(prompts[i], args.seed + i)
                diffusers_log.into = None
                c.denoise.append(sample.denoise_seconds)
                c.e2e.append(sample.e2e_seconds)
                c.memory.append(memory.mib)
            log(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{c.name} {c.denoise[-1]:.3f} s" for c in active))
    machine["loadavg_end"] = harness.loadavg()

    results = summarize(configs)
    report = {
        "date": common.utc_now(),
        "command": command,
        "config": {
            "model": manifest.name, "size": args.size, "engines": str(engines) if engines else None,
            "steps": args.steps, "repeats": args.repeats, "prompts": args.prompts, "seed": args.seed,
            "prompt_seed": PROMPT_SEED, "methods": methods, "backends": args.backends, "thresholds": args.thresholds,
            "device": args.device, "dtype": str(dtype).removeprefix("torch."), **harness.manifest_defaults(manifest),
            "timing": "denoising loop (tools/benchmark.py's window) and end-to-end call, medians over "
                      "interleaved rounds after a quality pass that warms every configuration up",
        },
        "machine": machine,
        "memory_method": memory.method,
        "results": results,
    }
    if mag is not None:
        report["magcache_ratios"] = {"ratios": mag, "source": (
            f"MagCacheConfig(calibrate=True, num_inference_steps={args.steps}) run once on {prompts[0]!r}, "
            f"seed {args.seed}, on this model, before the comparison")}
    report["table"] = table(results)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def more(report: dict, say) -> None:
        if args.plot:
            c = report["config"]
            plot(report["results"], args.plot, f"{c['model']} ({c['size']}), {c['steps']} steps, {c['device']}: "
                 f"speedup vs fidelity to diffusers full compute")
            say(f"wrote {args.plot}")

    return common.report_main("compare", args, argv, run_compare, markdown_section, more)


if __name__ == "__main__":
    sys.exit(main())
