"""The non-transformer parts of a text-to-video pipeline: text, scheduler, latents, VAE.

These follow diffusers' ``LattePipeline`` step for step (prompt preprocessing, T5 encoding
truncated to the prompt's tokens, CFG order [negative, positive], ``randn_tensor`` for the
initial latents, the scheduler's own ``scale_model_input``/``step``, chunked VAE decoding
and ``VideoProcessor`` post-processing), so the same seed gives the same video.
"""

from __future__ import annotations

import inspect
import json
import logging

import torch

from .errors import ManifestError
from .manifest import Manifest

log = logging.getLogger(__name__)


class PipelineParts:
    """Text encoder, tokenizer, VAE and scheduler loaded from the engines folder."""

    def __init__(self, manifest: Manifest, device: torch.device, components: dict | None = None):
        """Loads the components from the engines folder, or takes already-built ones
        (``components``: tokenizer, text_encoder, vae, scheduler) for an in-memory runtime."""
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one line per weight file is noise in a CLI
        p = manifest.pipeline
        if p.get("type") != "latte":
            raise ManifestError(f"pipeline type {p.get('type')!r} is not supported by this runtime version; upgrade foresight-dit")
        self.config = p
        self.device = device
        if components is not None:
            self.tokenizer = components["tokenizer"]
            self.text_encoder = components["text_encoder"].eval().to(device)
            self.vae = components["vae"].eval().to(device)
            self.scheduler_cls = type(components["scheduler"])
            self.scheduler_config = components["scheduler"].config
        else:
            self._load(manifest.root, p, device)
        from diffusers.video_processor import VideoProcessor

        self.video_processor = VideoProcessor(vae_scale_factor=p["vae_scale_factor"])

    def _load(self, root, p, device):
        import diffusers
        import transformers

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(root / p["tokenizer"])
            self.text_encoder = transformers.T5EncoderModel.from_pretrained(root / p["text_encoder"]).eval().to(device)
            self.vae = diffusers.AutoencoderKL.from_pretrained(root / p["vae"]).eval().to(device)
            sched_cfg = json.loads((root / p["scheduler"] / "scheduler_config.json").read_text())
            self.scheduler_cls = getattr(diffusers, sched_cfg["_class_name"])
            self.scheduler_config = self.scheduler_cls.from_pretrained(root / p["scheduler"]).config
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise ManifestError(f"could not load the pipeline components in {root}: {exc}; re-export the engines folder") from exc

    def new_scheduler(self):
        """A fresh scheduler per generation: schedulers carry per-run state."""
        return self.scheduler_cls.from_config(self.scheduler_config)

    def _encode(self, texts: list[str], max_length: int):
        inputs = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                                return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        embeds = self.text_encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0]
        return embeds, mask

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: bool) -> torch.Tensor:
        """Prompt embeddings as the transformer sees them: ``(2 or 1, T, C)``, negative first."""
        max_length = self.config["max_text_length"]
        # LattePipeline without caption cleaning: lower-case and strip.
        prompt = prompt.lower().strip()
        untruncated = self.tokenizer([prompt], padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] > max_length:
            log.warning("the prompt was truncated to %d tokens", max_length)
        embeds, mask = self._encode([prompt], max_length)
        keep = int(mask.sum()) if self.config.get("mask_text", True) else embeds.shape[1]
        embeds = embeds[:, :keep]
        if not guidance:
            return embeds
        negative, _ = self._encode([negative_prompt.lower().strip()], max_length)
        return torch.cat([negative[:, :keep], embeds], dim=0)

    def initial_latents(self, scheduler, frames: int, height: int, width: int, seed: int,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The starting noise, drawn as LattePipeline draws it (CPU generator, in the prompt
        embeddings' ``dtype``: a reduced-precision draw is not always the fp32 draw rounded),
        returned in fp32 for the runtime's fp32 scheduler."""
        from diffusers.utils.torch_utils import randn_tensor

        f = self.config["vae_scale_factor"]
        shape = (1, self.config["latent_channels"], frames, height // f, width // f)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype).float()
        return latents * scheduler.init_noise_sigma, generator

    @staticmethod
    def step_kwargs(scheduler, generator, eta: float = 0.0) -> dict:
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @staticmethod
    def uses_learned_sigma(scheduler) -> bool:
        return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor):
        """Latents ``(1, C, F, h, w)`` -> uint8 frames ``(F, H, W, 3)`` (numpy)."""
        import numpy as np

        frames = latents.shape[2]
        # Written as diffusers writes it (1/s * x, not x/s): the last bit matters for bit-identical frames.
        x = 1 / self.vae.config.scaling_factor * latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # (F, C, h, w)
        chunk = self.config.get("decode_chunk_size", 14)
        video = torch.cat([self.vae.decode(x[i:i + chunk]).sample for i in range(0, x.shape[0], chunk)])
        video = video.reshape(-1, frames, *video.shape[1:]).permute(0, 2, 1, 3, 4).float()  # (1, 3, F, H, W)
        out = self.video_processor.postprocess_video(video=video, output_type="np")[0]  # (F, H, W, 3) in [0, 1]
        return (out * 255).round().astype(np.uint8)
