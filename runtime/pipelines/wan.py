"""diffusers' ``WanPipeline`` (Wan 2.1 and Wan 2.2 A14B text-to-video): UMT5 prompts cleaned, padded
to the maximum length, trimmed to their tokens and zero-padded; latents drawn in fp32;
classifier-free guidance as two batch-1 passes per step (conditional, then unconditional); the
scheduler the checkpoint names (FlowMatchEuler or UniPC with its ``flow_shift``) from index 0;
with two experts the high-noise one (guidance ``guidance_scale``) for ``t >= boundary_ratio *
num_train_timesteps`` and the low-noise one (``guidance_scale_2``) below; ``AutoencoderKLWan``
decoding after de-normalising with the VAE's per-channel mean and std."""

from __future__ import annotations

import torch

from .base import PipelineParts, Sampler


class WanSampler(Sampler):
    """WanPipeline's loop: the latents in the engines' dtype as the model input (no input scaling),
    ``t`` for every batch row, ``uncond + g * (cond - uncond)``, then ``scheduler.step``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.scheduler.set_begin_index(0)

    def expert_schedule(self) -> list[int]:
        """Wan 2.2 A14B: the high-noise expert (0) while ``t >= boundary_ratio * num_train_timesteps``,
        the low-noise expert (1) below."""
        ratio = self.parts.config.get("boundary_ratio")
        if ratio is None:
            return [0] * len(self.timesteps)
        boundary = ratio * self.scheduler.config.num_train_timesteps
        return [0 if t >= boundary else 1 for t in self.timesteps]

    def fill(self, stem_in: dict, latents: torch.Tensor, i: int) -> None:
        model_input = torch.cat([latents] * 2) if self.guidance_scale is not None else latents
        stem_in["latents"].copy_(model_input)
        # ``(B,)``, or per token ``(B, F, h, w)`` (TI2V's expand_timesteps: text-to-video gives every token t)
        stem_in["timestep"].copy_(self.timesteps[i].expand(stem_in["timestep"].shape))

    def step(self, noise_pred: torch.Tensor, i: int, latents: torch.Tensor) -> torch.Tensor:
        if self.guidance_scale is not None:
            noise_pred = self.guide(noise_pred, self.scale(i))
        return self.scheduler.step(noise_pred, self.timesteps[i], latents, return_dict=False)[0]


class WanPipelineParts(PipelineParts):
    """WanPipeline's text encoding, sampling and decoding. Latents are ``(1, C, F, h, w)``."""

    type = "wan"
    sampler_cls = WanSampler
    separate_cfg = True  # the runtime runs the two CFG halves of each buffer as separate passes

    def initial_latents(self, scheduler, frames: int, height: int, width: int, seed: int,
                        dtype: torch.dtype = torch.float32):
        """WanPipeline draws its noise in fp32 whatever the model's dtype, unscaled."""
        from diffusers.utils.torch_utils import randn_tensor

        generator = torch.Generator(device="cpu").manual_seed(seed)
        shape = self.latent_shape(self.latent_frames(frames), height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32), generator

    def _embed(self, text: str) -> torch.Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        max_length = self.config["max_text_length"]
        inputs = self.tokenizer([prompt_clean(text)], padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = inputs.attention_mask.to(self.device)
        embeds = self.text_encoder(inputs.input_ids.to(self.device), mask).last_hidden_state[0]
        length = int(mask.gt(0).sum())
        return torch.cat([embeds[:length], embeds.new_zeros(max_length - length, embeds.shape[1])])[None]

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: bool) -> dict[str, torch.Tensor]:
        """``{"encoder_hidden_states": (2 or 1, T_max, C)}``, the negative prompt first."""
        self._warn_truncation(prompt, self.config["max_text_length"])
        embeds = self._embed(prompt)
        if guidance:
            embeds = torch.cat([self._embed(negative_prompt or ""), embeds], dim=0)
        return {"encoder_hidden_states": embeds}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames: int | None = None):
        """Latents ``(1, C, F, h, w)`` -> uint8 frames ``(frames, H, W, 3)`` (numpy)."""
        z = latents.shape[1]
        latents = latents.to(self.vae.dtype)
        mean = torch.tensor(self.config["latents_mean"]).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.config["latents_std"]).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        return self._postprocess(self.vae.decode(latents / inv_std + mean, return_dict=False)[0])
