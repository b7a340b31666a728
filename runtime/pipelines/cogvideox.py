"""diffusers' ``CogVideoXPipeline``: T5 padded to 226 tokens without a mask, CogVideoXDDIM or
CogVideoXDPM stepping, optional dynamic CFG, rotary or sin-cos position tables per shape,
``AutoencoderKLCogVideoX`` with 4x temporal compression."""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError
from .base import PipelineParts, Sampler


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
