"""The text encoder and the VAE decoder as parts ``--backend aoti`` compiles (``aoti.components`` in the
manifest), so a host without Python goes from a prompt to frames: modules with plain tensor I/O around
the diffusers components, called as the Python runtime calls them."""

from __future__ import annotations

import torch


class TextEncoderPart(torch.nn.Module):
    """``(input_ids, attention_mask) -> last hidden state``: a transformers encoder as the runtime runs it."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask=attention_mask)[0]


class VaeDecoderPart(torch.nn.Module):
    """``latents -> images``: ``vae.decode(latents).sample`` on latents the runtime has already scaled."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


def scaled_range(spec: dict, times: int) -> dict:
    return {k: spec[k] * times for k in ("min", "opt", "max")}
