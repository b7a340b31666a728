"""Open-Sora 1.2's rectified-flow sampler (``RFLOW``), as in the release's ``opensora/schedulers/rf``.

Conventions: ``x_t = (1 - t/1000) x0 + (t/1000) eps`` and the model predicts
``v = x0 - eps``, so one Euler step is ``z += v * dt`` with ``dt = (t_i - t_{i+1}) / 1000``
(the last step ``t_last / 1000``), from ``t = 1000`` (pure noise) down to 0.

Model-agnostic: :meth:`RFlowSampler.sample` calls ``model_fn(z_in, t_in)`` on the CFG
batch (conditional first half, unconditional second) and keeps the first
``z.shape[1]`` output channels (STDiT3 predicts 8; channels 0-3 are the velocity).
The release's image/video-conditioning masks (``x_mask`` from a mask strategy) are not
implemented: for text-to-video its mask is all ones, which leaves every step unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def timestep_transform(t, height, width, num_frames, num_timesteps: int = 1000,
                       base_resolution: int = 512 * 512) -> torch.Tensor:
    """Shift timesteps towards the noisy end for larger videos: ``r t' / (1 + (r - 1) t')``.

    ``t' = t / num_timesteps``; ``r = ratio_space * ratio_time`` with
    ``ratio_space = sqrt(height * width / 512^2)`` (pixels) and
    ``ratio_time = sqrt(num_frames // 17 * 5)`` (pixel frames; 1 for a single image, decided
    by the first sample as the release does). The arithmetic runs in the dtype of the
    inputs: pass height/width/num_frames in bf16 to reproduce the release's rounding
    (it builds them in the model dtype).
    """
    t = torch.as_tensor(t)
    height, width, num_frames = (torch.as_tensor(v, dtype=torch.float32) if not isinstance(v, torch.Tensor) else v
                                 for v in (height, width, num_frames))
    t = t / num_timesteps
    ratio_space = (height * width / base_resolution).sqrt()
    if num_frames.reshape(-1)[0] == 1:
        frames = torch.ones_like(num_frames)
    else:
        frames = num_frames // 17 * 5  # latent frames of the 17 -> 5 VAE
        if bool((frames == 0).any()):
            # The release would get ratio 0 and every timestep 0 (no denoising at all).
            raise ValueError(f"num_frames {num_frames.tolist()}: Open-Sora 1.2 samples 1 frame or at least 17")
    ratio_time = frames.sqrt()
    ratio = ratio_space * ratio_time
    new_t = ratio * t / (1 + (ratio - 1) * t)
    return new_t * num_timesteps


@dataclass(frozen=True)
class RFlowSampler:
    """Open-Sora 1.2 defaults: 30 steps, CFG 7.0, timestep transform on."""

    num_steps: int = 30
    guidance_scale: float = 7.0
    use_timestep_transform: bool = True
    num_timesteps: int = 1000

    def __post_init__(self):
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {self.num_steps!r}")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive int, got {self.num_timesteps!r}")

    def timesteps(self, height, width, num_frames, batch_size: int = 1, device=None) -> list[torch.Tensor]:
        """``t_i = (1 - i/N) * 1000`` for i < N, each a ``(batch_size,)`` fp32 tensor, transformed."""
        n, big = self.num_steps, self.num_timesteps
        ts = [torch.full((batch_size,), (1.0 - i / n) * big, dtype=torch.float32, device=device) for i in range(n)]
        if self.use_timestep_transform:
            ts = [timestep_transform(t, height, width, num_frames, big) for t in ts]
        return ts

    def sample(self, model_fn: Callable, z: torch.Tensor, timesteps: list[torch.Tensor]) -> torch.Tensor:
        """Integrate ``z`` (noise, ``(B, C, T, H, W)``) from ``timesteps[0]`` to 0 with CFG."""
        for i, t in enumerate(timesteps):
            out = model_fn(torch.cat([z, z]), torch.cat([t, t]))  # (2B, C_out, ...)
            z = self.step(out, i, z, timesteps)
        return z

    def step(self, out: torch.Tensor, i: int, z: torch.Tensor, timesteps: list[torch.Tensor],
             guidance: bool = True) -> torch.Tensor:
        """One Euler step from ``timesteps[i]`` given the model output on the CFG batch
        (conditional half first; ``guidance`` False: the batch is ``z`` alone)."""
        v = out[:, : z.shape[1]]
        if guidance:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + self.guidance_scale * (v_cond - v_uncond)
        t = timesteps[i]
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(t)
        dt = (t - t_next) / self.num_timesteps  # (B,)
        return z + v * dt.reshape(-1, *[1] * (z.dim() - 1))
