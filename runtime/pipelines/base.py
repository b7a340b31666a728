"""The non-transformer parts of a text-to-video pipeline: text, scheduler, latents, VAE.

One class per pipeline type the manifest can name (``pipeline.type``), each following its
reference pipeline step for step, so the same seed gives the same video:

- ``latte``: diffusers' ``LattePipeline`` (lower-cased prompt, T5 truncated to the prompt's
  tokens, the scheduler's ``scale_model_input``/``step``, learned-sigma split, chunked
  per-frame VAE decoding).
- ``opensora``: our eager Open-Sora 1.2 reference (``dit.opensora_pipeline``):
  T5 with the aesthetic suffix, the learned null caption, rectified flow, our OpenSoraVAE.
- ``cogvideox``: diffusers' ``CogVideoXPipeline`` (T5 padded to 226 tokens without a mask,
  CogVideoXDDIM or CogVideoXDPM stepping, optional dynamic CFG, rotary or sin-cos position
  tables per shape, ``AutoencoderKLCogVideoX`` with 4x temporal compression).

The runtime's loop is the same for all of them:

    cond = pipe.encode_prompt(...)               # constant stem inputs, e.g. encoder_hidden_states
    sampler = pipe.sampler(steps, ...)           # scheduler state and the starting latents
    for i in range(len(sampler.timesteps)):
        sampler.fill(stem_inputs, latents, i)    # latents (CFG-doubled, scaled), timestep
        out = <stem, planned layers, head>
        latents = sampler.step(out, i, latents)  # guidance + scheduler step
    frames = pipe.decode(latents, num_frames)

plus ``pipe.shape_inputs(dims)``: tensors the pipeline computes once per shape and the
manifest's flow lists under ``pipeline_inputs`` (CogVideoX's rotary tables).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import pkgutil

import torch

from ..errors import ManifestError, ShapeError
from ..manifest import Manifest

log = logging.getLogger(__name__)


@contextlib.contextmanager
def component_errors(manifest: Manifest):
    """Any failure while loading the text encoder, tokenizer, VAE or scheduler (a truncated
    weights file, a malformed tokenizer.json, ...) becomes one message naming the folder."""
    try:
        yield
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - loaders raise many types; the message keeps theirs
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ManifestError(f"could not load the pipeline components in {manifest.root} ({what}); the files may be "
                            f"corrupt (run without skipping hash checks) or from another version: re-export the "
                            f"engines folder") from None


def make_pipeline(manifest: Manifest, device: torch.device, components: dict | None = None) -> "PipelineParts":
    """The pipeline class the manifest's ``pipeline.type`` names (one module of this package per type)."""
    from .. import pipelines

    for info in pkgutil.iter_modules(pipelines.__path__):
        importlib.import_module(f"{pipelines.__name__}.{info.name}")
    kind = manifest.pipeline.get("type")
    if kind not in PipelineParts.registry:
        raise ManifestError(f"pipeline type {kind!r} is not supported by this runtime version; upgrade foresight-dit")
    return PipelineParts.registry[kind](manifest, device, components)


TEXT_ENCODERS = ("T5EncoderModel", "UMT5EncoderModel")  # the encoder-only T5 classes the models ship


def text_encoder_class(folder):
    """The transformers class a text encoder folder's config names (T5 or UMT5 encoder), else T5's."""
    import transformers

    try:
        name = (json.loads((folder / "config.json").read_text()).get("architectures") or ["T5EncoderModel"])[0]
    except (OSError, ValueError):
        name = "T5EncoderModel"
    if name not in TEXT_ENCODERS:
        raise ManifestError(f"{folder}: text encoder class {name} is not one of {', '.join(TEXT_ENCODERS)}; "
                            f"re-export from a supported checkpoint")
    return getattr(transformers, name)


class PipelineParts:
    """Text encoder, tokenizer, VAE and scheduler loaded from the engines folder (or given
    already built, ``components``: tokenizer, text_encoder, vae, scheduler)."""

    type: str  # the manifest's pipeline.type this class runs
    sampler_cls: type
    vae_tiling = False
    separate_cfg = False  # True: CFG runs as two batch-1 passes per step (the runtime's _passes)
    registry: dict[str, type["PipelineParts"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PipelineParts.registry[cls.type] = cls

    def __init__(self, manifest: Manifest, device: torch.device, components: dict | None = None):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one line per weight file is noise in a CLI
        self.config = manifest.pipeline
        self.device = device
        if components is not None:
            self.tokenizer = components["tokenizer"]
            self.text_encoder = components["text_encoder"].eval().to(device)
            self.vae = components["vae"].eval().to(device)
            self.scheduler_cls = type(components["scheduler"])
            self.scheduler_config = components["scheduler"].config
        else:
            self._load(manifest, device)
        from diffusers.video_processor import VideoProcessor

        self.video_processor = VideoProcessor(vae_scale_factor=self.config["vae_scale_factor"])

    def _load(self, manifest: Manifest, device):
        import diffusers
        import transformers

        with component_errors(manifest):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(manifest.component("tokenizer"),
                                                                        local_files_only=True)
            text_dir = manifest.component("text_encoder")
            self.text_encoder = text_encoder_class(text_dir).from_pretrained(
                text_dir, local_files_only=True).eval().to(device)
            vae_dir = manifest.component("vae")
            vae_cls = getattr(diffusers, json.loads((vae_dir / "config.json").read_text())["_class_name"])
            self.vae = vae_cls.from_pretrained(vae_dir, local_files_only=True).eval().to(device)
            sched_dir = manifest.component("scheduler")
            self.scheduler_cls = getattr(diffusers, json.loads((sched_dir / "scheduler_config.json").read_text())["_class_name"])
            self.scheduler_config = self.scheduler_cls.from_pretrained(sched_dir, local_files_only=True).config

    def use_compiled_components(self, manifest: Manifest, device: torch.device) -> None:
        """Encode prompts and decode latents with the folder's compiled text encoder and VAE decoder
        (``aoti.components``: what the C++ runtime runs) instead of the eager modules."""
        from ..aoti import CompiledComponent, CompiledTextEncoder
        from ..errors import ConfigError

        found = (manifest.aoti or {}).get("components", {})
        if set(found) != {"text_encoder", "vae_decoder"}:
            raise ConfigError(f"{manifest.root} has no compiled text encoder and VAE decoder: export it with "
                              f"`foresight-export --backend aoti`")
        self.text_encoder = CompiledTextEncoder(CompiledComponent(manifest, "text_encoder", device))
        self.vae = self.compiled_vae(CompiledComponent(manifest, "vae_decoder", device))

    def compiled_vae(self, component):
        """The VAE as the pipeline calls it, decoding with the compiled ``component``."""
        from ..aoti import CompiledVaeDecoder

        return CompiledVaeDecoder(component, self.vae)

    def check_decodable(self, frames: int) -> None:
        """Refuse, before denoising, a frame count the VAE cannot decode here (a compiled video decoder's
        is its one frame count)."""
        check = getattr(self.vae, "check_frames", None)
        if check is not None:
            check(frames)

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping spatial tiles (and the VAE's own frame batches): bounded memory
        for long or large videos, at a small cost in seams (diffusers' ``enable_tiling``)."""
        self.vae.enable_tiling()
        self.vae_tiling = True

    # ------------------------------------------------------------ shapes
    def latent_frames(self, frames: int) -> int:
        """Latent frames for ``frames`` video frames (the VAE's temporal compression)."""
        ratio = self.config.get("vae_scale_factor_temporal", 1)
        if ratio == 1:
            return frames
        if (frames - 1) % ratio:
            lo = frames - (frames - 1) % ratio
            raise ShapeError(f"frames={frames} does not fit the VAE's {ratio}x temporal compression: "
                             f"pass --frames {lo} or {lo + ratio} (1 + a multiple of {ratio})")
        return (frames - 1) // ratio + 1

    @staticmethod
    def text_tokens(cond: dict[str, torch.Tensor]) -> int:
        """The T dimension of the encoded prompt (``encode_prompt``'s result)."""
        return cond["encoder_hidden_states"].shape[1]

    def shape_inputs(self, dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """Tensors the pipeline computes per shape for the flow's ``pipeline_inputs`` (none here)."""
        return {}

    # ------------------------------------------------------------ text
    def _encode(self, texts: list[str], max_length: int, pass_mask: bool = True):
        inputs = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        embeds = self.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask if pass_mask else None)[0]
        return embeds, mask

    def _warn_truncation(self, prompt: str, max_length: int) -> None:
        untruncated = self.tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] > max_length:
            log.warning("the prompt was truncated to %d tokens", max_length)

    # ------------------------------------------------------------ sampling
    def new_scheduler(self):
        """A fresh scheduler per generation: schedulers carry per-run state."""
        return self.scheduler_cls.from_config(self.scheduler_config)

    def initial_latents(self, scheduler, frames: int, height: int, width: int, seed: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The starting noise, drawn as the reference pipeline draws it (CPU generator, in the prompt
        embeddings' ``dtype``: a reduced-precision draw is not always the fp32 draw rounded),
        returned in fp32 for the runtime's fp32 scheduler. ``frames`` are video frames."""
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = self.latent_shape(self.latent_frames(frames), height, width)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype).float()
        return latents * scheduler.init_noise_sigma, generator

    def latent_shape(self, latent_frames: int, height: int, width: int) -> tuple:
        f = self.config["vae_scale_factor"]
        return (1, self.config["latent_channels"], latent_frames, height // f, width // f)

    @staticmethod
    def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def sampler(self, steps: int, frames: int, height: int, width: int, seed: int, guidance_scale: float | None,
                dtype: torch.dtype = torch.float32, guidance_scale_2: float | None = None) -> "Sampler":
        """Per-generation sampling state; ``guidance_scale`` None = no CFG; ``guidance_scale_2``: the
        second expert's scale (two-expert models; None = ``guidance_scale``)."""
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        latents, generator = self.initial_latents(scheduler, frames, height, width, seed, dtype)
        sampler = self.sampler_cls(self, scheduler, latents, self.step_kwargs(scheduler, generator), guidance_scale,
                                   steps)
        if guidance_scale is not None and guidance_scale_2 is not None:
            sampler.guidance_scale_2 = guidance_scale_2
        return sampler

    def _postprocess(self, video: torch.Tensor):
        """``(1, 3, F, H, W)`` in [-1, 1] -> uint8 frames ``(F, H, W, 3)`` (numpy)."""
        import numpy as np

        out = self.video_processor.postprocess_video(video=video.float(), output_type="np")[0]  # (F, H, W, 3) in [0, 1]
        return (out * 255).round().astype(np.uint8)


class Sampler:
    """One generation's scheduler loop, as the reference pipeline writes it (diffusers schedulers)."""

    def __init__(self, parts: PipelineParts, scheduler, latents: torch.Tensor, step_kwargs: dict,
                 guidance_scale: float | None, steps: int):
        self.parts, self.scheduler, self.latents = parts, scheduler, latents
        self.step_kwargs, self.guidance_scale, self.steps = step_kwargs, guidance_scale, steps
        self.guidance_scale_2 = guidance_scale
        self.timesteps = scheduler.timesteps
        self.experts = self.expert_schedule()

    def expert_schedule(self) -> list[int]:
        """Which of the engines folder's experts runs each step (one expert: 0 throughout)."""
        return [0] * len(self.timesteps)

    @property
    def stages(self) -> tuple[int, ...]:
        """The steps at which a new expert takes over (with 0): the controller's stages."""
        e = self.experts
        return (0, *(i for i in range(1, len(e)) if e[i] != e[i - 1]))

    def scale(self, i: int) -> float | None:
        """The guidance scale of step ``i``: the second expert's steps take ``guidance_scale_2``."""
        return self.guidance_scale_2 if self.experts[i] else self.guidance_scale

    def fill(self, stem_in: dict, latents: torch.Tensor, i: int) -> None:
        t = self.timesteps[i]
        model_input = torch.cat([latents] * 2) if self.guidance_scale is not None else latents
        stem_in["latents"].copy_(self.scheduler.scale_model_input(model_input, t))
        stem_in["timestep"].fill_(float(t))

    def guide(self, noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
        uncond, text = noise_pred.chunk(2)
        return uncond + scale * (text - uncond)


