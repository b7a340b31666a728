"""CogVideoX (diffusers ``CogVideoXTransformer3DModel``) cut into exportable parts.

Layers carry two tensors: the video tokens (the Foresight probe) and the text tokens (cached
and restored with them). The rotary position embedding, which CogVideoXPipeline computes
outside the transformer, is an input of every layer (computed by the runtime per shape), laid
out per token grid ``(F, h, w, head_dim)`` so every shape is a product of the manifest's symbols.

Not registered in ``get_family`` yet: the runtime has no CogVideoX pipeline (T5 with 226
tokens, CogVideoXDDIM/DPM schedulers, ``AutoencoderKLCogVideoX``), so ``--model cogvideox`` would
export engines nothing can run. Only rotary-embedding configurations (CogVideoX-5B) are split
here: the 2B's sincos table is chosen inside diffusers' patch embedding by comparing the input
size with the training size, which an export with dynamic sizes cannot keep.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import IOSpec, PartSpec, grid_dims


def _tokens(x):  # (B, F, h, w, D) -> (B, F*h*w, D)
    return x.flatten(1, 3)


def _grid(x, like):  # (B, F*h*w, D) -> like's (B, F, h, w, D)
    return x.reshape(like.shape[0], like.shape[1], like.shape[2], like.shape[3], x.shape[-1])


class CogVideoXStem(nn.Module):
    """Timestep embedding, text projection and patch embedding (text and video tokens apart)."""

    def __init__(self, model):
        super().__init__()
        self.time_proj, self.time_embedding = model.time_proj, model.time_embedding
        self.patch_embed = model.patch_embed
        self.patch_size = model.config.patch_size

    def forward(self, latents, timestep, encoder_hidden_states):
        b, f, _, hh, ww = latents.shape
        emb = self.time_embedding(self.time_proj(timestep).to(latents.dtype))
        tokens = self.patch_embed(encoder_hidden_states, latents)  # (B, T + F*h*w, D)
        t = encoder_hidden_states.shape[1]
        text, video = tokens[:, :t], tokens[:, t:]
        return video.reshape(b, f, hh // self.patch_size, ww // self.patch_size, video.shape[-1]), text, emb


class CogVideoXLayer(nn.Module):
    """One ``CogVideoXBlock``: ``(hidden, text)`` in, ``(hidden_out, text_out)`` out."""

    def __init__(self, model, index: int):
        super().__init__()
        self.block = model.transformer_blocks[index]

    def forward(self, hidden, text, temb, rotary_cos, rotary_sin):
        rotary = (rotary_cos.flatten(0, 2), rotary_sin.flatten(0, 2))  # (F*h*w, head_dim)
        video, text = self.block(hidden_states=_tokens(hidden), encoder_hidden_states=text, temb=temb,
                                 image_rotary_emb=rotary)
        return _grid(video, hidden), text


class CogVideoXHead(nn.Module):
    """Final norms, projection and unpatchify to ``(B, F, C_out, H, W)``."""

    def __init__(self, model):
        super().__init__()
        self.norm_final, self.norm_out, self.proj_out = model.norm_final, model.norm_out, model.proj_out
        self.patch_size = model.config.patch_size

    def forward(self, hidden, temb):
        b, f, h, w, _ = hidden.shape
        p = self.patch_size
        x = self.proj_out(self.norm_out(self.norm_final(_tokens(hidden)), temb=temb))  # (B, N, p*p*C)
        x = x.reshape(b, f, h, w, -1, p, p)
        return x.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)


def parts(model) -> list[PartSpec]:
    cfg = model.config
    if not cfg.use_rotary_positional_embeddings or cfg.patch_size_t is not None:
        raise NotImplementedError("only CogVideoX 1.0 configurations with rotary embeddings (5B) are split so far")
    d = cfg.num_attention_heads * cfg.attention_head_dim
    e, c_in, c_out = cfg.time_embed_dim, cfg.in_channels, cfg.out_channels
    hidden, text = ["B", "F", "h", "w", d], ["B", "T", d]
    rotary = [IOSpec("rotary_cos", ["F", "h", "w", cfg.attention_head_dim]),
              IOSpec("rotary_sin", ["F", "h", "w", cfg.attention_head_dim])]
    stem = PartSpec(
        "stem", CogVideoXStem(model),
        inputs=[IOSpec("latents", ["B", "F", c_in, "H", "W"]),
                IOSpec("timestep", ["B"], low=0.0, high=1000.0, fixed_dtype=True),
                IOSpec("encoder_hidden_states", ["B", "T", cfg.text_embed_dim])],
        outputs=[IOSpec("hidden", hidden), IOSpec("text", text), IOSpec("temb", ["B", e])],
    )
    layers = [PartSpec(f"layer_{i:03d}", CogVideoXLayer(model, i),
                       inputs=[IOSpec("hidden", hidden), IOSpec("text", text), IOSpec("temb", ["B", e]), *rotary],
                       outputs=[IOSpec("hidden_out", hidden), IOSpec("text_out", text)])
              for i in range(cfg.num_layers)]
    head = PartSpec("head", CogVideoXHead(model), inputs=[IOSpec("hidden", hidden), IOSpec("temb", ["B", e])],
                    outputs=[IOSpec("noise_pred", ["B", "F", c_out, "H", "W"])])
    return [stem, *layers, head]


def dims(model, max_frames: int = 13, max_grid: int = 16) -> dict:
    p = model.config.patch_size
    return grid_dims((1, 2, max_frames), max_grid, model.config.max_text_seq_length, (p, p))


def stacked(parts_: list[PartSpec], inputs: dict) -> torch.Tensor:
    """Run the parts in order with every layer computed (policy none)."""
    stem, *layers, head = parts_
    with torch.no_grad():
        hidden, text, temb = stem.module(inputs["latents"], inputs["timestep"], inputs["encoder_hidden_states"])
        for layer in layers:
            hidden, text = layer.module(hidden, text, temb, inputs["rotary_cos"], inputs["rotary_sin"])
        return head.module(hidden, temb)
