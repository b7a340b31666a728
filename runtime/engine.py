"""``Runtime``: load an engines folder and generate videos with a Foresight policy.

Per denoising step: the controller plans (which layers run, which cached output feeds
the first of them) before any engine runs; the executor follows the plan exactly, calling
the stem, the planned suffix of layers and the head; the probe mse values and finite
checks of the step reach the host in one transfer and go back to the controller.

Thread safety: one ``Runtime`` runs one generation at a time. Concurrent ``generate`` calls
(threads of a server) are serialised by a lock: each waits for the one before it, and its
frames equal what a sequential call gives. For parallel generations load one ``Runtime`` per
worker (each owns its engines and buffers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from foresight import Controller, Policy, make_config, policy_options

from .backends import make_backend
from .buffers import BufferPool
from .errors import ConfigError, NumericsError, ShapeError
from .manifest import Manifest, load_manifest
from .pipelines import PipelineParts, make_pipeline


@dataclass
class GenerationResult:
    frames: "object"  # numpy uint8 (F, H, W, 3)
    latents: torch.Tensor
    stats: dict
    trace: dict = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class StepInfo:
    """What ``generate(on_step=...)`` is told after each denoising step."""
    step: int  # steps done, 1..steps
    steps: int
    layers_computed: int  # in this step
    layers_skipped: int  # so far, every step's together
    layers_total: int  # steps x layers
    seconds: float  # this step's wall time (the plan, its engines, guidance and the scheduler step)


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu`` or ``cuda[:N]`` that exists here (default: cuda when available), else a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device: pass cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: the runtime runs on cpu or cuda only")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is available here (or torch was built without CUDA); "
                              "pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be a whole number in 0..2**64-1 (got {seed!r}); pass e.g. --seed 0")
    return seed


class Runtime:
    POOL_CACHE_SIZE = 4  # buffer pools kept (one per shape: the text length varies with the prompt)

    def __init__(self, manifest: Manifest, backend, parts: PipelineParts, device: torch.device,
                 expert_backends: tuple = ()):
        self.manifest = manifest
        self.backend = backend  # expert 0's engines (the only ones of a one-transformer model)
        self.backends = (backend, *expert_backends)  # one per expert (manifest.expert(k)), same backend kind
        if len(self.backends) != manifest.num_experts:
            raise ConfigError(f"{manifest.root} has {manifest.num_experts} experts; give one backend per expert")
        self.parts = parts
        self.device = device
        self._pools: OrderedDict[tuple, BufferPool] = OrderedDict()  # least recently used first
        self.pools_created = 0  # counters: the pool cache's bound is tested through them
        self.pools_evicted = 0
        self._lock = threading.Lock()  # one generation at a time (see the module docstring)
        self.num_layers = manifest.num_layers
        self.probes = manifest.probes

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", device: str | None = None,
             verify_hashes: bool = True, manifest: Manifest | None = None, compiled_components: bool = False,
             **backend_kwargs) -> "Runtime":
        """Load the engines folder ``path`` (or an already loaded ``manifest``) on ``backend``.
        ``compiled_components``: encode prompts and decode latents with the folder's AOTInductor text encoder
        and VAE decoder (as the C++ runtime does) instead of the eager ones."""
        dev = resolve_device(device)
        manifest = manifest or load_manifest(path, verify_hashes=verify_hashes)
        if manifest.experts and backend == "tensorrt":
            raise ConfigError(f"{manifest.root} has {manifest.num_experts} experts (Wan 2.2 A14B): TensorRT engines for "
                              f"two-expert folders are not built yet; run with --backend aoti, onnxruntime or torch")
        if manifest.experts and "modules" in backend_kwargs:
            raise ConfigError("modules= hands the torch backend one transformer; a two-expert folder loads its own")
        engines = [make_backend(backend, manifest.expert(k), dev, **backend_kwargs) for k in range(manifest.num_experts)]
        pipe = make_pipeline(manifest, dev)
        if compiled_components:
            pipe.use_compiled_components(manifest, dev)
        return cls(manifest, engines[0], pipe, dev, tuple(engines[1:]))

    # ---------------------------------------------------------------- shapes
    def pool(self, dims: dict[str, int]) -> BufferPool:
        """The buffers for one shape, from a cache of at most ``POOL_CACHE_SIZE`` (least recently used out)."""
        key = tuple(sorted(dims.items()))
        if key in self._pools:
            self._pools.move_to_end(key)
            return self._pools[key]
        if len(self._pools) >= self.POOL_CACHE_SIZE:
            self._pools.popitem(last=False)
            self.pools_evicted += 1
            for backend in self.backends:
                backend.forget_buffers()  # captured CUDA graphs point into the evicted buffers
        self._pools[key] = BufferPool(self.manifest, dims, self.device, dtype=self.backend.io_dtype)
        self.pools_created += 1
        return self._pools[key]

    # ---------------------------------------------------------------- policy
    def make_policy(self, policy=None, **overrides) -> Policy:
        """A validated policy: a name (foresight starts from the manifest's defaults) or a policy
        object, with the non-None ``overrides`` applied on top."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(policy, Policy):
            wrong = sorted(set(given) - set(policy_options(policy.name)))
            if wrong:
                raise ConfigError(f"{', '.join(wrong)} does not apply to policy {policy.name!r}")
            return dataclasses.replace(policy, **given) if given else policy
        if policy is not None and not isinstance(policy, str):
            raise ConfigError(f"policy must be a name, a Policy or a Controller (got {type(policy).__name__})")
        name = policy or "foresight"
        values = dict(self.manifest.foresight_defaults) if name == "foresight" else {}
        return make_config(name, **{**values, **given})

    def controller(self, policy=None, **overrides) -> Controller:
        """A fresh controller for one generation; a given ``Controller`` is checked and reset."""
        if isinstance(policy, Controller):
            if overrides and any(v is not None for v in overrides.values()):
                raise ConfigError("policy options apply to a policy name or object, not to a Controller")
            if (policy.num_layers, policy.num_probes) != (self.num_layers, len(self.probes)):
                raise ConfigError(f"the controller is for {policy.num_layers} layers x {policy.num_probes} probes; "
                                  f"these engines have {self.num_layers} x {len(self.probes)}")
            policy.reset()
            return policy
        return Controller(self.make_policy(policy, **overrides), self.num_layers, len(self.probes))

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, policy=None, progress: bool = False,
                 decode: bool = True, guidance_scale_2: float | None = None, on_step=None,
                 **policy_overrides) -> GenerationResult:
        """One video. ``policy``: a name (``none``, ``static``, ``foresight``...), a policy object, or a
        ``Controller`` (reset here); ``policy_overrides`` set its options (``threshold=...``).
        ``guidance_scale_2``: the second expert's guidance (two-expert models, Wan 2.2 A14B).
        ``on_step(StepInfo)`` is called after every denoising step; an exception it raises stops the
        generation between steps and propagates (a server cancels a job this way; the next call starts
        from fresh state). Concurrent calls on one Runtime run one after another (see the module docstring)."""
        t_start = time.perf_counter()
        req = check_request(self.manifest, prompt, negative_prompt, num_frames, height, width, num_inference_steps,
                            guidance_scale, seed, guidance_scale_2)
        controller = self.controller(policy, **policy_overrides)
        controller.config.check_run(self.num_layers, req["steps"])
        with self._lock:
            return self._generate(req, controller, progress, decode, t_start, on_step)

    def _generate(self, req: dict, controller: Controller, progress: bool, decode: bool,
                  t_start: float, on_step=None) -> GenerationResult:
        self.parts.latent_frames(req["frames"])  # the VAE's frame rule, naming the nearest valid counts
        if decode:
            self.parts.check_decodable(req["frames"])
        prompt, seed, config = req["prompt"], req["seed"], controller.config
        frames, height, width, steps = req["frames"], req["height"], req["width"], req["steps"]
        guidance_scale, negative_prompt = req["guidance_scale"], req["negative_prompt"]
        cfg = guidance_scale > 1.0
        p = self.parts.config

        t0 = time.perf_counter()
        cond = self.parts.encode_prompt(prompt, negative_prompt, cfg)
        text_seconds = time.perf_counter() - t0
        dtype = next(iter(cond.values())).dtype
        sampler = self.parts.sampler(steps, frames, height, width, seed, guidance_scale if cfg else None, dtype,
                                     req["guidance_scale_2"])
        # One stage per expert: nothing measured or cached under one expert is used under the other.
        config.check_run(self.num_layers, steps, sampler.stages)
        controller.reset(stages=sampler.stages)

        f = p["vae_scale_factor"] * p["patch_size"]
        text_tokens = self.parts.text_tokens(cond)
        dims = self.manifest.dims.bind(B=2 if cfg else 1, F=self.parts.latent_frames(frames), h=height // f,
                                       w=width // f, T=text_tokens)
        pool = self.pool(dims)
        pool.reset()
        for name, value in cond.items():
            pool.stem_in[name].copy_(value)
        for name, value in self.parts.shape_inputs(dims).items():
            pool.shape_in[name].copy_(value)
        calls_before = self.layer_engine_calls()
        copied_before = sum(b.bytes_copied for b in self.backends)

        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sampler.timesteps), desc="denoise", unit="step")
        with contextlib.ExitStack() as stack:
            for backend in self.backends:
                stack.enter_context(backend.denoise_context())
            latents = self._denoise(sampler, pool, controller, bar, on_step)
        if bar is not None:
            bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        denoise_seconds = time.perf_counter() - t0

        t0 = time.perf_counter()
        video = self.parts.decode(latents, frames) if decode else None
        if video is not None and video.shape[:3] != (frames, height, width):
            raise ShapeError(
                f"the VAE decoded {video.shape[0]} frames of {video.shape[1]}x{video.shape[2]} instead of "
                f"{frames} of {height}x{width}" + (": VAE tiling with tiles this size does not reproduce the frame "
                                                   "size; run without --vae-tiling" if self.parts.vae_tiling else "")
            )
        decode_seconds = time.perf_counter() - t0

        summary = controller.summary()
        calls = self.layer_engine_calls() - calls_before
        stats = {
            "policy": config.name,
            "policy_config": config.to_dict(),
            "backend": self.backend.name,
            "device": str(self.device),
            "prompt": prompt,
            "seed": seed,
            "frames": frames, "height": height, "width": width,
            "guidance_scale": guidance_scale,
            **({"guidance_scale_2": sampler.guidance_scale_2 if cfg else None,
                "stages": list(sampler.stages), "experts": list(sampler.experts)} if self.manifest.experts else {}),
            "steps": steps,
            "num_layers": self.num_layers,
            "layer_calls": summary["layer_calls"],
            "layer_calls_skipped": summary["layer_calls_skipped"],
            "skipped_share": summary["layer_calls_skipped"] / max(1, steps * self.num_layers),
            "layer_engine_calls": calls,
            # Reuse binds cached buffers (0 bytes); backends whose engines return their own tensors (torch,
            # aoti) add the one copy of each result into its buffer.
            "bytes_copied": pool.bytes_copied + sum(b.bytes_copied for b in self.backends) - copied_before,
            "buffer_bytes": pool.bytes_allocated,
            "text_encode_seconds": text_seconds,
            "denoise_seconds": denoise_seconds,
            "decode_seconds": decode_seconds,
            "total_seconds": time.perf_counter() - t_start,
            "trace": controller.trace,
        }
        return GenerationResult(frames=video, latents=latents, stats=stats, trace=stats["trace"])

    def layer_engine_calls(self) -> int:
        """Layer engine calls so far, every expert's together (a counter tests prove reuse with)."""
        return sum(b.calls[layer.name] for b in self.backends for layer in self.manifest.layers)

    def _denoise(self, sampler, pool, controller, bar, on_step=None):
        """The denoising loop: the pipeline's sampler prepares each step's stem inputs and applies
        guidance and the scheduler step; the controller's plan decides which layers run, on the
        engines of the expert the sampler names for the step."""
        latents = sampler.latents
        steps, skipped = len(sampler.timesteps), 0
        for i in range(steps):
            t0 = time.perf_counter()
            sampler.fill(pool.stem_in, latents, i)
            plan = controller.plan(i)
            backend = self.backends[sampler.experts[i]]
            noise_pred = self._run_step(plan, pool, controller, i, backend).float()  # guidance, scheduler in fp32
            latents = sampler.step(noise_pred, i, latents)
            if bar is not None:
                bar.set_postfix_str(f"layers {len(plan.computed)}/{self.num_layers}")
                bar.update()
            if on_step is not None:
                skipped += self.num_layers - len(plan.computed)
                on_step(StepInfo(i + 1, steps, len(plan.computed), skipped, steps * self.num_layers,
                                 time.perf_counter() - t0))
        return latents

    def _name_non_finite(self, plan, pool: BufferPool, step: int) -> None:
        """The head's output is not finite: find the first part that produced NaN/Inf.

        Only the head is checked every step (NaN/Inf propagate through attention and
        normalisation to it); this search runs once, on the error path, while every computed
        layer's output of the step is still in its buffer.
        """
        main = self.probes[-1]
        suspects = list(plan.computed) if plan.source is None else [plan.source[0], *plan.computed]
        for layer in suspects:
            if not bool(torch.isfinite(pool.cached(layer)[main]).all()):
                raise NumericsError(
                    f"layer {layer} ({self.manifest.layers[layer].name}) produced NaN/Inf at step {step}: "
                    f"check the engines with foresight-export's validation, the input shapes and the precision"
                )
        raise NumericsError(f"the head produced NaN/Inf at step {step}: check the inputs and the engines")

    @staticmethod
    def _resolve(source, pool: BufferPool, state: dict) -> torch.Tensor:
        """The buffer a flow :class:`~runtime.manifest.Source` names (resolved at load)."""
        if source.kind == "state":
            return state[source.name]
        if source.kind == "input":  # a stem input the layers read too (Open-Sora's caption mask)
            return pool.stem_in[source.name]
        return pool.shape_in[source.name] if source.kind == "pipeline" else pool.stem_out[source.name]

    def _passes(self, pool: BufferPool) -> list:
        """The transformer passes of one step: one over the whole batch, or, for pipelines that run
        classifier-free guidance as two batch-1 passes (WanPipeline: conditional, then unconditional),
        the conditional half then the unconditional half of every batch-leading buffer."""
        if not self.parts.separate_cfg or pool.dims["B"] != 2:
            return [None]
        return [slice(1, 2), slice(0, 1)]  # the batch is [unconditional, conditional]

    @staticmethod
    def _cut(tensors: dict, specs, half) -> dict:
        """The views of one pass: the ``half`` rows of every tensor whose spec leads with the batch."""
        if half is None:
            return tensors
        batch = {t.name for t in specs if t.shape and t.shape[0] == "B"}
        return {name: (t[half] if name in batch else t) for name, t in tensors.items()}

    def _run_step(self, plan, pool: BufferPool, controller, step: int, backend) -> torch.Tensor:
        """Execute one planned step; returns the head's output (a buffer, valid until the next step).

        With two CFG passes both run the same plan, each on its half of every buffer, so a reused
        layer's cache holds both passes' outputs and a probe's mse is taken over both halves
        together: the mean of the two passes' mse (one decision per step for the whole batch)."""
        flow, manifest = self.manifest.flow, self.manifest
        num_probes = len(self.probes)
        stats = pool.stats
        stem, head = manifest.stem, manifest.head
        for half in self._passes(pool):
            backend.run("stem", self._cut(pool.stem_in, stem.inputs, half), self._cut(pool.stem_out, stem.outputs, half))
            if plan.source is None:
                state = {s: pool.stem_out[o] for s, o in flow.state_init.items()}
            else:
                cached = pool.cached(plan.source[0])
                state = {s: cached[o] for s, o in flow.layer_state_out.items()}
            for layer in plan.computed:
                spec = manifest.layers[layer]
                inputs = {name: self._resolve(flow.layer_inputs[name], pool, state) for name in spec.input_names}
                out = pool.scratch(layer)
                backend.run(spec.name, self._cut(inputs, spec.inputs, half), self._cut(out, spec.outputs, half))
                state = {s: out[o] for s, o in flow.layer_state_out.items()}
            head_inputs = {name: self._resolve(flow.head_inputs[name], pool, state) for name in head.input_names}
            backend.run("head", self._cut(head_inputs, head.inputs, half), self._cut(pool.head_out, head.outputs, half))
        for layer in plan.computed:  # every pass has written its scratch: measure, then it becomes the cache
            if plan.measure:
                out, old = pool.scratch(layer), pool.cached(layer)
                for k, probe in enumerate(self.probes):
                    stats[layer * num_probes + k] = probe_mse(out[probe], old[probe])
            pool.commit(layer)
        result = pool.head_out[flow.head_output]
        stats[-1] = torch.isfinite(result).all()
        host = stats.tolist()  # the step's single device-to-host transfer
        if not host[-1]:
            self._name_non_finite(plan, pool, step)
        if plan.measure:
            rows = [host[l * num_probes:(l + 1) * num_probes] for l in plan.computed]
            for layer, row in zip(plan.computed, rows):
                if not all(math.isfinite(v) for v in row):  # finite outputs, but their change overflowed
                    raise NumericsError(f"layer {layer} ({manifest.layers[layer].name}): the change of its output "
                                        f"at step {step} is not finite: check the engines' precision and inputs")
            controller.observe(rows)
        return result


def probe_mse(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """mean((new - old)^2) in fp32: in fp16 the square of a difference above 256 is inf."""
    if new.dtype != torch.float32:
        new, old = new.float(), old.float()
    return torch.mean(torch.square(new - old), dtype=torch.float32)


def check_shape(manifest: Manifest, frames, height, width) -> tuple[int, int, int]:
    """Frames, height and width (defaults filled in) inside the exported ranges and multiples."""
    out = []
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        spec = manifest.shapes[name]
        value = spec["default"] if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number (got {value!r})")
        if not spec["min"] <= value <= spec["max"]:
            raise ShapeError(f"{name}={value} is outside the exported range [{spec['min']}, {spec['max']}]: "
                             f"pass --{name} within it, or re-export with a larger range (foresight-export --max-scale)")
        step = spec.get("multiple_of", 1)
        if value % step:
            lo = value - value % step
            raise ShapeError(f"{name}={value} is not divisible by {step} (patch size x VAE factor): "
                             f"pass --{name} {lo if lo >= spec['min'] else lo + step} or {lo + step}")
        out.append(value)
    return tuple(out)


def check_request(manifest: Manifest, prompt, negative_prompt=None, num_frames=None, height=None, width=None,
                  num_inference_steps=None, guidance_scale=None, seed=0, guidance_scale_2=None) -> dict:
    """Generation arguments checked against the manifest alone (no engine, no model loaded), with the
    defaults filled in: ``{prompt, negative_prompt, frames, height, width, steps, guidance_scale,
    guidance_scale_2, seed}`` (``guidance_scale_2`` None for one-transformer models)."""
    p = manifest.pipeline
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string (got {type(prompt).__name__})")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ConfigError(f"negative_prompt must be a string (got {type(negative_prompt).__name__})")
    shape = dict(zip(("frames", "height", "width"), check_shape(manifest, num_frames, height, width)))
    steps = p["default_steps"] if num_inference_steps is None else num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= p["max_steps"]:
        raise ConfigError(f"steps must be a whole number in 1..{p['max_steps']} (the scheduler's training "
                          f"timesteps; got {steps!r}): pass e.g. --steps {p['default_steps']}")
    guidance = p["default_guidance"] if guidance_scale is None else guidance_scale
    _check_guidance(guidance, "--guidance", p["default_guidance"])
    if manifest.experts:
        default_2 = p.get("default_guidance_2")
        guidance_2 = (guidance if default_2 is None else default_2) if guidance_scale_2 is None else guidance_scale_2
        _check_guidance(guidance_2, "--guidance-2", default_2 if default_2 is not None else p["default_guidance"])
        guidance_2 = float(guidance_2)
    elif guidance_scale_2 is not None:
        raise ConfigError("guidance_scale_2 (--guidance-2) is the second expert's guidance; these engines have one "
                          "transformer: drop it")
    else:
        guidance_2 = None
    return {"prompt": prompt,
            "negative_prompt": p.get("default_negative_prompt") if negative_prompt is None else negative_prompt,
            **shape, "steps": steps, "guidance_scale": float(guidance), "guidance_scale_2": guidance_2,
            "seed": check_seed(seed)}


def _check_guidance(value, flag: str, example) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"guidance scale must be a finite number >= 0 (got {value!r}); <= 1 disables "
                          f"classifier-free guidance: pass e.g. {flag} {example}")
