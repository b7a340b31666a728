"""diffusers' ``LattePipeline``: lower-cased prompt, T5 truncated to the prompt's tokens, the
scheduler's ``scale_model_input``/``step``, learned-sigma split, chunked per-frame VAE decoding."""

from __future__ import annotations

import torch

from .base import PipelineParts, Sampler


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
