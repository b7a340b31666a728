"""``Runtime``: load an engines folder and generate videos with a Foresight policy.

Per denoising step: the controller plans (which layers run, which cached output feeds
the first of them) before any engine runs; the executor follows the plan exactly, calling
the stem, the planned suffix of layers and the head; the probe mse values and finite
checks of the step reach the host in one transfer and go back to the controller.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from foresight import ForesightConfig, NoneConfig, StaticConfig, make_config, make_controller

from .backends import make_backend
from .buffers import BufferPool
from .errors import NumericsError, ShapeError
from .manifest import Manifest, load_manifest
from .pipeline import PipelineParts, make_pipeline


@dataclass
class GenerationResult:
    frames: "object"  # numpy uint8 (F, H, W, 3)
    latents: torch.Tensor
    stats: dict
    trace: dict = field(repr=False, default_factory=dict)


class Runtime:
    def __init__(self, manifest: Manifest, backend, parts: PipelineParts, device: torch.device):
        self.manifest = manifest
        self.backend = backend
        self.parts = parts
        self.device = device
        self._pools: dict[tuple, BufferPool] = {}
        self.num_layers = manifest.num_layers
        self.probes = manifest.flow["probes"]

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", device: str | None = None,
             verify_hashes: bool = True, **backend_kwargs) -> "Runtime":
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        manifest = load_manifest(path, verify_hashes=verify_hashes)
        engine = make_backend(backend, manifest, dev, **backend_kwargs)
        return cls(manifest, engine, make_pipeline(manifest, dev), dev)

    # ---------------------------------------------------------------- shapes
    def resolve_shape(self, frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
        """Video frames, height and width (defaults filled in), checked against the built ranges."""
        shapes = self.manifest.data["shapes"]
        out = []
        for name, value in (("frames", frames), ("height", height), ("width", width)):
            spec = shapes[name]
            value = spec["default"] if value is None else int(value)
            flag = f"--{name}"
            if not spec["min"] <= value <= spec["max"]:
                raise ShapeError(
                    f"{name}={value} is outside the exported range [{spec['min']}, {spec['max']}]: "
                    f"pass {flag} within it, or re-export with a larger range (foresight-export --max-scale)"
                )
            step = spec.get("multiple_of", 1)
            if value % step:
                lo = value - value % step
                raise ShapeError(
                    f"{name}={value} is not divisible by {step} (patch size x VAE factor): "
                    f"pass {flag} {lo if lo >= spec['min'] else lo + step} or {lo + step}"
                )
            out.append(value)
        self.parts.latent_frames(out[0])  # frames the VAE cannot produce fail here, naming the nearest ones
        return tuple(out)

    def pool(self, dims: dict[str, int]) -> BufferPool:
        key = tuple(sorted(dims.items()))
        if key not in self._pools:
            self._pools[key] = BufferPool(self.manifest, dims, self.device, dtype=self.backend.io_dtype)
        return self._pools[key]

    # ---------------------------------------------------------------- policy
    def make_policy(self, policy=None, **overrides):
        """A validated policy config: a name (foresight starts from the manifest's defaults) or
        a config object, with the non-None ``overrides`` applied on top."""
        if isinstance(policy, (NoneConfig, StaticConfig, ForesightConfig)):
            name = policy.name
            values = {k: v for k, v in policy.to_dict().items() if k != "policy"}
        else:
            name = policy or "foresight"
            values = dict(self.manifest.data["foresight_defaults"]) if name == "foresight" else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return make_config(name, **values)

    # ---------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, prompt: str, negative_prompt: str | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, policy=None, progress: bool = False,
                 decode: bool = True, **policy_overrides) -> GenerationResult:
        t_start = time.perf_counter()
        p = self.parts.config
        config = self.make_policy(policy, **policy_overrides)
        frames, height, width = self.resolve_shape(num_frames, height, width)
        steps = int(p["default_steps"] if num_inference_steps is None else num_inference_steps)
        if steps < 1:
            raise ShapeError(f"--steps must be >= 1 (got {steps})")
        guidance_scale = p["default_guidance"] if guidance_scale is None else float(guidance_scale)
        negative_prompt = p["default_negative_prompt"] if negative_prompt is None else negative_prompt
        cfg = guidance_scale > 1.0

        t0 = time.perf_counter()
        cond = self.parts.encode_prompt(prompt, negative_prompt, cfg)
        text_seconds = time.perf_counter() - t0
        dtype = next(iter(cond.values())).dtype
        sampler = self.parts.sampler(steps, frames, height, width, seed, guidance_scale if cfg else None, dtype)

        f = p["vae_scale_factor"] * p["patch_size"]
        text_tokens = self.parts.text_tokens(cond)
        dims = self.manifest.bind_dims(B=2 if cfg else 1, F=self.parts.latent_frames(frames), h=height // f,
                                       w=width // f, T=text_tokens)
        pool = self.pool(dims)
        pool.reset()
        for name, value in cond.items():
            pool.stem_in[name].copy_(value)
        for name, value in self.parts.shape_inputs(dims).items():
            pool.shape_in[name].copy_(value)
        controller = make_controller(config, self.num_layers, len(self.probes))
        calls_before = sum(self.backend.calls[layer["name"]] for layer in self.manifest.layers)

        t0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sampler.timesteps), desc="denoise", unit="step")
        with self.backend.denoise_context():
            latents = self._denoise(sampler, pool, controller, bar)
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
        calls = sum(self.backend.calls[layer["name"]] for layer in self.manifest.layers) - calls_before
        stats = {
            "policy": config.name,
            "policy_config": config.to_dict(),
            "backend": self.backend.name,
            "device": str(self.device),
            "prompt": prompt,
            "seed": seed,
            "frames": frames, "height": height, "width": width,
            "guidance_scale": guidance_scale,
            "steps": steps,
            "num_layers": self.num_layers,
            "layer_calls": summary["layer_calls"],
            "layer_calls_skipped": summary["layer_calls_skipped"],
            "skipped_share": summary["layer_calls_skipped"] / max(1, steps * self.num_layers),
            "layer_engine_calls": calls,
            "bytes_copied": pool.bytes_copied,
            "buffer_bytes": pool.bytes_allocated,
            "text_encode_seconds": text_seconds,
            "denoise_seconds": denoise_seconds,
            "decode_seconds": decode_seconds,
            "total_seconds": time.perf_counter() - t_start,
            "trace": controller.trace,
        }
        return GenerationResult(frames=video, latents=latents, stats=stats, trace=stats["trace"])

    def _denoise(self, sampler, pool, controller, bar):
        """The denoising loop: the pipeline's sampler prepares each step's stem inputs and applies
        guidance and the scheduler step; the controller's plan decides which layers run."""
        latents = sampler.latents
        for i in range(len(sampler.timesteps)):
            sampler.fill(pool.stem_in, latents, i)
            plan = controller.plan(i)
            noise_pred = self._run_step(plan, pool, controller, i).float()  # guidance and scheduler in fp32
            latents = sampler.step(noise_pred, i, latents)
            if bar is not None:
                bar.set_postfix_str(f"layers {len(plan.computed)}/{self.num_layers}")
                bar.update()
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
                    f"layer {layer} ({self.manifest.layers[layer]['name']}) produced NaN/Inf at step {step}: "
                    f"check the engines with foresight-export's validation, the input shapes and the precision"
                )
        raise NumericsError(f"the head produced NaN/Inf at step {step}: check the inputs and the engines")

    def _resolve(self, source: str, pool: BufferPool, state: dict) -> torch.Tensor:
        kind, name = source.split(":", 1)
        if kind == "state":
            return state[name]
        if kind == "input":  # a stem input the layers read too (Open-Sora's caption mask)
            return pool.stem_in[name]
        return pool.shape_in[name] if kind == "pipeline" else pool.stem_out[name]

    def _run_step(self, plan, pool: BufferPool, controller, step: int) -> torch.Tensor:
        """Execute one planned step; returns the head's output (a buffer, valid until the next step)."""
        flow, manifest, backend = self.manifest.flow, self.manifest, self.backend
        num_probes = len(self.probes)
        stats = pool.stats
        backend.run("stem", pool.stem_in, pool.stem_out)
        if plan.source is None:
            state = {s: pool.stem_out[o] for s, o in flow["state_init"].items()}
        else:
            cached = pool.cached(plan.source[0])
            state = {s: cached[o] for s, o in flow["layer_state_out"].items()}
        for layer in plan.computed:
            spec = manifest.layers[layer]
            inputs = {io["name"]: self._resolve(flow["layer_inputs"][io["name"]], pool, state) for io in spec["inputs"]}
            out = pool.scratch(layer)
            backend.run(spec["name"], inputs, out)
            if plan.measure:
                old = pool.cached(layer)
                for k, probe in enumerate(self.probes):
                    stats[layer * num_probes + k] = torch.mean(torch.square(out[probe] - old[probe]),
                                                               dtype=torch.float32)
            pool.commit(layer)
            state = {s: out[o] for s, o in flow["layer_state_out"].items()}
        head_inputs = {io["name"]: self._resolve(flow["head_inputs"][io["name"]], pool, state)
                       for io in manifest.head["inputs"]}
        backend.run("head", head_inputs, pool.head_out)
        result = pool.head_out[flow["head_output"]]
        stats[-1] = torch.isfinite(result).all()
        host = stats.tolist()  # the step's single device-to-host transfer
        if not host[-1]:
            self._name_non_finite(plan, pool, step)
        if plan.measure:
            controller.observe([host[l * num_probes:(l + 1) * num_probes] for l in plan.computed])
        return result
