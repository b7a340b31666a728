"""The non-transformer parts of a text-to-video pipeline: text, scheduler, latents, VAE.

One class per pipeline type the manifest can name (``pipeline.type``), each following its
reference pipeline step for step, so the same seed gives the same video:

- ``latte``: diffusers' ``LattePipeline`` (lower-cased prompt, T5 truncated to the prompt's
  tokens, the scheduler's ``scale_model_input``/``step``, learned-sigma split, chunked
  per-frame VAE decoding).
- ``opensora``: our eager Open-Sora 1.2 reference (``exporter.models.opensora_pipeline``):
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

import inspect
import json
import logging
import math

import torch

from .errors import ManifestError, ShapeError
from .manifest import Manifest

log = logging.getLogger(__name__)


def make_pipeline(manifest: Manifest, device: torch.device, components: dict | None = None) -> "PipelineParts":
    """The pipeline class the manifest's ``pipeline.type`` names."""
    kind = manifest.pipeline.get("type")
    classes = {"latte": LattePipelineParts, "cogvideox": CogVideoXPipelineParts, "opensora": OpenSoraPipelineParts}
    if kind not in classes:
        raise ManifestError(f"pipeline type {kind!r} is not supported by this runtime version; upgrade foresight-dit")
    return classes[kind](manifest, device, components)


class PipelineParts:
    """Text encoder, tokenizer, VAE and scheduler loaded from the engines folder (or given
    already built, ``components``: tokenizer, text_encoder, vae, scheduler)."""

    type = "base"
    vae_tiling = False

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
            self._load(manifest.root, self.config, device)
        from diffusers.video_processor import VideoProcessor

        self.video_processor = VideoProcessor(vae_scale_factor=self.config["vae_scale_factor"])

    def _load(self, root, p, device):
        import diffusers
        import transformers

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(root / p["tokenizer"])
            self.text_encoder = transformers.T5EncoderModel.from_pretrained(root / p["text_encoder"]).eval().to(device)
            vae_cfg = json.loads((root / p["vae"] / "config.json").read_text())
            self.vae = getattr(diffusers, vae_cfg["_class_name"]).from_pretrained(root / p["vae"]).eval().to(device)
            sched_cfg = json.loads((root / p["scheduler"] / "scheduler_config.json").read_text())
            self.scheduler_cls = getattr(diffusers, sched_cfg["_class_name"])
            self.scheduler_config = self.scheduler_cls.from_pretrained(root / p["scheduler"]).config
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ManifestError(f"could not load the pipeline components in {root}: {exc}; re-export the engines folder") from exc

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
                dtype: torch.dtype = torch.float32) -> "Sampler":
        """Per-generation sampling state; ``guidance_scale`` None = no CFG."""
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        latents, generator = self.initial_latents(scheduler, frames, height, width, seed, dtype)
        return self.sampler_cls(self, scheduler, latents, self.step_kwargs(scheduler, generator), guidance_scale, steps)

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
        self.timesteps = scheduler.timesteps

    def fill(self, stem_in: dict, latents: torch.Tensor, i: int) -> None:
        t = self.timesteps[i]
        model_input = torch.cat([latents] * 2) if self.guidance_scale is not None else latents
        stem_in["latents"].copy_(self.scheduler.scale_model_input(model_input, t))
        stem_in["timestep"].fill_(float(t))

    def guide(self, noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
        uncond, text = noise_pred.chunk(2)
        return uncond + scale * (text - uncond)


class LatteSampler(Sampler):
    def step(self, noise_pred: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale is not None:
            noise_pred = self.guide(noise_pred, self.guidance_scale)
        if getattr(self.scheduler.config, "variance_type", None) not in ("learned", "learned_range"):
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        return self.scheduler.step(noise_pred, self.timesteps[i], latents, **self.step_kwargs, return_dict=False)[0]


class LattePipelineParts(PipelineParts):
    type = "latte"
    sampler_cls = LatteSampler

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: bool) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (2 or 1, T, C)}``, negative first, truncated to the prompt's tokens."""
        max_length = self.config["max_text_length"]
        # LattePipeline without caption cleaning: lower-case and strip.
        prompt = prompt.lower().strip()
        self._warn_truncation(prompt, max_length)
        embeds, mask = self._encode([prompt], max_length)
        keep = int(mask.sum()) if self.config.get("mask_text", True) else embeds.shape[1]
        embeds = embeds[:, :keep]
        if guidance:
            negative, _ = self._encode([negative_prompt.lower().strip()], max_length)
            embeds = torch.cat([negative[:, :keep], embeds], dim=0)
        return {"encoder_hidden_states": embeds}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames: int | None = None):
        """Latents ``(1, C, F, h, w)`` -> uint8 frames ``(F, H, W, 3)`` (numpy)."""
        n = latents.shape[2]
        # Written as diffusers writes it (1/s * x, not x/s): the last bit matters for bit-identical frames.
        x = 1 / self.vae.config.scaling_factor * latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (F, C, h, w)
        chunk = self.config.get("decode_chunk_size", 14)
        video = torch.cat([self.vae.decode(x[i:i + chunk]).sample for i in range(0, x.shape[0], chunk)])
        video = video.reshape(-1, n, *video.shape[1:]).permute(0, 2, 1, 3, 4)  # (1, 3, F, H, W)
        return self._postprocess(video)


class CogVideoXSampler(Sampler):
    """CogVideoXPipeline's loop: DDIM-style ``step`` or the DPM scheduler's two-sample ``step``,
    and the optional dynamic CFG scale (``1 + s * (1 - cos(pi * ((N - t) / N) ** 5)) / 2``)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.old_pred_original_sample = None
        self.dpm = type(self.scheduler).__name__ == "CogVideoXDPMScheduler"

    def step(self, noise_pred: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[i]
        if self.guidance_scale is not None:
            scale = self.guidance_scale
            if self.parts.config.get("use_dynamic_cfg", False):
                scale = 1 + scale * (1 - math.cos(math.pi * ((self.steps - t.item()) / self.steps) ** 5.0)) / 2
            noise_pred = self.guide(noise_pred, scale)
        if not self.dpm:
            return self.scheduler.step(noise_pred, t, latents, **self.step_kwargs, return_dict=False)[0]
        latents, self.old_pred_original_sample = self.scheduler.step(
            noise_pred, self.old_pred_original_sample, t, self.timesteps[i - 1] if i > 0 else None, latents,
            **self.step_kwargs, return_dict=False)
        return latents


class CogVideoXPipelineParts(PipelineParts):
    """CogVideoXPipeline's text encoding, sampling, position tables and decoding.

    Latents are ``(1, F, C, h, w)`` (frames before channels, as CogVideoX's transformer takes them).
    """

    type = "cogvideox"
    sampler_cls = CogVideoXSampler

    def latent_shape(self, latent_frames: int, height: int, width: int) -> tuple:
        f = self.config["vae_scale_factor"]
        return (1, latent_frames, self.config["latent_channels"], height // f, width // f)

    def latent_frames(self, frames: int) -> int:
        """CogVideoXPipeline's ``(frames - 1) // 4 + 1`` latent frames, for the frame counts its VAE
        gives back: it keeps the first latent frame as one video frame only when the latent count is
        odd (F odd -> 4F - 3 frames, F even -> 4F), so 8k + 1 and 8k frames (49, 48, ...)."""
        ratio = self.config.get("vae_scale_factor_temporal", 4)
        latent = (frames - 1) // ratio + 1
        if self.decoded_frames(latent) != frames:
            valid = {self.decoded_frames(n) for n in range(max(1, latent - 2), latent + 3)}
            below, above = max(v for v in valid if v < frames), min(v for v in valid if v > frames)
            raise ShapeError(f"frames={frames}: CogVideoX's VAE makes {self.decoded_frames(latent)} frames from the "
                             f"{latent} latent frames it would take; pass --frames {below} or {above} (8k + 1 or 8k)")
        return latent

    def decoded_frames(self, latent_frames: int) -> int:
        ratio = self.config.get("vae_scale_factor_temporal", 4)
        return ratio * (latent_frames - 1) + 1 if latent_frames % 2 else ratio * latent_frames

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: bool) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (2 or 1, 226, C)}``: padded to the full length and encoded
        without an attention mask, as CogVideoXPipeline does; negative first."""
        max_length = self.config["max_text_length"]
        self._warn_truncation(prompt, max_length)
        embeds, _ = self._encode([prompt], max_length, pass_mask=False)
        if guidance:
            negative, _ = self._encode([negative_prompt or ""], max_length, pass_mask=False)
            embeds = torch.cat([negative, embeds], dim=0)
        return {"encoder_hidden_states": embeds}

    def shape_inputs(self, dims: dict[str, int]) -> dict[str, torch.Tensor]:
        """The position tables CogVideoXPipeline / the patch embedding compute for this shape:
        rotary cos/sin ``(F, h, w, head_dim)`` (5B) or the 3D sin-cos table ``(F, h, w, D)`` (2B)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed, get_3d_sincos_pos_embed

        p = self.config
        f, h, w = dims["F"], dims["h"], dims["w"]
        if p["positional"] == "rotary":
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            crops = get_resize_crop_region_for_grid((h, w), p["base_grid"][1], p["base_grid"][0])
            cos, sin = get_3d_rotary_pos_embed(embed_dim=p["head_dim"], crops_coords=crops, grid_size=(h, w),
                                               temporal_size=f, device=self.device)
            return {"rotary_cos": cos.reshape(f, h, w, -1), "rotary_sin": sin.reshape(f, h, w, -1)}
        pos = get_3d_sincos_pos_embed(p["hidden_size"], (w, h), f, p["spatial_interpolation_scale"],
                                      p["temporal_interpolation_scale"], device=self.device, output_type="pt")
        return {"pos_embedding": pos.reshape(f, h, w, -1)}  # (F, h*w, D) -> (F, h, w, D)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames: int | None = None):
        """Latents ``(1, F, C, h, w)`` -> uint8 frames ``(frames, H, W, 3)`` (numpy)."""
        x = 1 / self.vae.config.scaling_factor * latents.permute(0, 2, 1, 3, 4)  # (1, C, F, h, w)
        return self._postprocess(self.vae.decode(x).sample)


class OpenSoraSampler(Sampler):
    """Open-Sora 1.2's rectified-flow loop (``exporter.models.rflow.RFlowSampler``): the CFG batch is
    ``[conditional, unconditional]``, the model's first 4 output channels are the velocity, one
    Euler step per timestep. fps and the pixel size are stem inputs, as the release passes them."""

    def __init__(self, parts, rflow, latents, timesteps, frames, height, width, guidance_scale):
        self.parts, self.rflow, self.latents, self.timesteps = parts, rflow, latents, timesteps
        self.guidance_scale = guidance_scale
        self.extras = {"fps": float(parts.config["fps"]), "height": float(height), "width": float(width)}

    def fill(self, stem_in: dict, latents: torch.Tensor, i: int) -> None:
        cfg = self.guidance_scale is not None
        stem_in["latents"].copy_(torch.cat([latents, latents]) if cfg else latents)
        stem_in["timestep"].copy_(torch.cat([self.timesteps[i]] * 2) if cfg else self.timesteps[i])
        for name, value in self.extras.items():
            stem_in[name].fill_(value)

    def step(self, noise_pred: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        return self.rflow.step(noise_pred, i, latents, self.timesteps, guidance=self.guidance_scale is not None)


class OpenSoraPipelineParts(PipelineParts):
    """Open-Sora 1.2: T5 with the aesthetic-score suffix, padded to the model's caption length
    with its mask; CFG against the model's learned null caption (``y_embedding``, exported next
    to the engines); rectified flow with the resolution/frames timestep transform; our
    OpenSoraVAE (spatial SDXL VAE + temporal causal VAE, 17-frame micro chunks)."""

    type = "opensora"

    def __init__(self, manifest: Manifest, device: torch.device, components: dict | None = None):
        self.config = manifest.pipeline
        self.device = device
        if components is not None:
            self.tokenizer, self.vae = components["tokenizer"], components["vae"].eval().to(device)
            self.text_encoder = components["text_encoder"].eval().to(device)
            self.rflow_config = dict(components["scheduler"])
            self.null_caption = components["null_caption"].to(device)
        else:
            self._load(manifest.root, self.config, device)

    def _load(self, root, p, device):
        import transformers
        from safetensors.torch import load_file

        from exporter.models.opensora_vae import load_opensora_vae

        transformers.utils.logging.disable_progress_bar()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(root / p["tokenizer"])
            self.text_encoder = transformers.T5EncoderModel.from_pretrained(root / p["text_encoder"]).eval().to(device)
            self.vae = load_opensora_vae(root / p["vae"]).eval().to(device)
            self.rflow_config = json.loads((root / p["scheduler"] / "scheduler_config.json").read_text())
            self.null_caption = load_file(str(root / p["null_caption"]))["y_embedding"].to(device)
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ManifestError(f"could not load the pipeline components in {root}: {exc}; re-export the engines folder") from exc

    def enable_vae_tiling(self) -> None:
        raise ShapeError("--vae-tiling is not available for Open-Sora: its VAE already decodes 17-frame chunks, "
                         "frame by frame in the spatial stage")

    def latent_frames(self, frames: int) -> int:
        if frames < self.config["micro_frame_size"]:
            raise ShapeError(f"frames={frames}: Open-Sora 1.2 makes videos of at least {self.config['micro_frame_size']} "
                             f"frames (its timestep transform needs one full VAE chunk); pass --frames 17 or more")
        return self.vae.latent_frames(frames)  # the loaded VAE's own chunking rule

    @staticmethod
    def text_tokens(cond: dict[str, torch.Tensor]) -> int:
        return cond["caption"].shape[1]

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str | None, guidance: bool) -> dict[str, torch.Tensor]:
        """``{"caption": (2 or 1, T, C), "caption_mask": (2 or 1, T)}``: the prompt with the aesthetic
        suffix, then (with guidance) the null caption under the same mask."""
        if negative_prompt:
            raise ShapeError("Open-Sora 1.2 guides against its learned null caption: --negative-prompt is not "
                             "supported for this model")
        from exporter.models.opensora_pipeline import append_score

        text = append_score(prompt, self.config.get("aesthetic_score"))
        max_length = self.config["max_text_length"]
        self._warn_truncation(text, max_length)
        embeds, mask = self._encode([text], max_length)
        mask = mask.float()
        if not guidance:
            return {"caption": embeds, "caption_mask": mask}
        null = self.null_caption[None, :embeds.shape[1]].to(embeds.dtype)
        return {"caption": torch.cat([embeds, null]), "caption_mask": torch.cat([mask, mask])}

    def sampler(self, steps: int, frames: int, height: int, width: int, seed: int, guidance_scale: float | None,
                dtype: torch.dtype = torch.float32) -> OpenSoraSampler:
        from exporter.models.rflow import RFlowSampler

        rflow = RFlowSampler(num_steps=steps, guidance_scale=guidance_scale or 1.0,
                             use_timestep_transform=self.rflow_config.get("use_timestep_transform", True),
                             num_timesteps=self.rflow_config.get("num_timesteps", 1000))
        size = [torch.tensor([float(v)]) for v in (height, width, frames)]
        timesteps = [t.to(self.device) for t in rflow.timesteps(*size)]
        f = self.config["vae_scale_factor"]
        shape = (1, self.config["latent_channels"], self.latent_frames(frames), height // f, width // f)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        return OpenSoraSampler(self, rflow, latents, timesteps, frames, height, width, guidance_scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames: int | None = None):
        """Latents ``(1, 4, F', h, w)`` -> uint8 ``(frames, H, W, 3)``, rounded as the release's
        ``save_sample``: clamp to [-1, 1], to [0, 1], ``* 255 + 0.5``, truncate."""
        from exporter.models.opensora_pipeline import to_frames

        return to_frames(self.vae.decode(latents.float(), frames))
