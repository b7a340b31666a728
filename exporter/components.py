"""The text encoder and the VAE decoder as parts ``--backend aoti`` compiles (``aoti.components`` in the
manifest), so a host without Python goes from a prompt to frames: modules with plain tensor I/O around
the diffusers components, called as the Python runtime calls them.

Video VAEs decode frame chunks in a Python loop over the latent frames (Wan's causal cache,
CogVideoX's frame batches, Open-Sora's temporal chunks): their decoder is compiled for one latent
frame count, the pipeline's default video (``default_frames``), at every image size the layers take.
"""

from __future__ import annotations

import torch

from .families.base import IOSpec, PartSpec


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


class FramesVaeDecoderPart(torch.nn.Module):
    """``latents -> images`` for a VAE whose ``decode`` takes the video frame count (Open-Sora 1.2's)."""

    def __init__(self, vae, frames: int):
        super().__init__()
        self.vae, self.frames = vae, frames

    def forward(self, latents):
        return self.vae.decode(latents, self.frames)


def text_encoder(encoder, max_length: int) -> tuple[PartSpec, dict]:
    """The prompt encoder at ``max_length`` tokens, one or two prompts per call."""
    vocab = int(encoder.config.vocab_size)
    part = PartSpec("text_encoder", TextEncoderPart(encoder).float().eval(),
                    inputs=[IOSpec("input_ids", ["B", max_length], "int64", 0, vocab - 1, fixed_dtype=True),
                            IOSpec("attention_mask", ["B", max_length], "int64", 0, 2, fixed_dtype=True)],
                    outputs=[IOSpec("embeddings", ["B", max_length, int(encoder.config.d_model)], fixed_dtype=True)])
    return part, {"B": {"min": 1, "opt": 1, "max": 2}}


def video_decoder(module, channels: int, latent_frames: int, frames: int, dims_spec: dict, patch: int,
                  scale: int) -> tuple[PartSpec, dict]:
    """A video VAE's decoder for one video of ``latent_frames`` latent frames (``frames`` video frames)
    at every latent size the layers take (the token grid ``dims_spec`` h, w times ``patch``). The batch
    is 1 (``B`` 1..1), as the pipelines decode: a program traced with a dynamic batch computed batch 1
    wrongly (AutoencoderKLWan, torch 2.13: relative error ~1)."""
    part = PartSpec("vae_decoder", module.float().eval(),
                    inputs=[IOSpec("latents", ["B", channels, latent_frames, "h", "w"], fixed_dtype=True)],
                    outputs=[IOSpec("images", ["B", 3, frames, "Y", "X"], fixed_dtype=True)])
    dims = {"B": {"min": 1, "opt": 1, "max": 1}, "h": scaled_range(dims_spec["h"], patch),
            "w": scaled_range(dims_spec["w"], patch), "Y": {"of": "h", "times": scale}, "X": {"of": "w", "times": scale}}
    return part, dims


def scaled_range(spec: dict, times: int) -> dict:
    return {k: spec[k] * times for k in ("min", "opt", "max")}
