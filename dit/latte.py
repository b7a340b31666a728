"""Latte (diffusers ``LatteTransformer3DModel``) split into stem, layers and head.

Between parts the hidden state travels as ``(B, F, h, w, D)``: batch (CFG doubles it),
frames, token grid rows/cols, hidden size. Keeping h and w as separate axes lets every
part export with independent dynamic dims and lets the head unpatchify without knowing
the resolution from elsewhere. Every module below reproduces
``LatteTransformer3DModel.forward`` exactly, op for op, on its slice of the model, for
2 <= frames <= video_length (diffusers skips the temporal position table at F == 1 and
fails for other F; we slice the table, and the exported range starts at F = 2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from diffusers.models.embeddings import get_2d_sincos_pos_embed

FAMILY = "latte"


def repeat_rows(x: torch.Tensor, repeats) -> torch.Tensor:
    """``x.repeat_interleave(repeats, dim=0)`` written as expand + reshape.

    Same values; the ONNX exporter lowers repeat_interleave with a fixed trailing shape,
    which breaks dynamic dims, while expand + reshape stays symbolic.
    """
    return x.unsqueeze(1).expand(x.shape[0], repeats, *x.shape[1:]).reshape(-1, *x.shape[1:])


class LatteStem(nn.Module):
    """Patch + 2D sincos position embedding, adaLN-single timestep embedding, caption projection."""

    def __init__(self, model):
        super().__init__()
        self.proj = model.pos_embed.proj
        self.base_size = model.pos_embed.base_size
        self.interpolation_scale = model.pos_embed.interpolation_scale
        self.patch_size = model.config.patch_size
        self.adaln_single = model.adaln_single
        self.caption_projection = model.caption_projection

    def forward(self, latents, timestep, encoder_hidden_states):
        b, c, f, H, W = latents.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, H, W)  # (B*F, C, H, W)
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B*F, h*w, D)
        # diffusers recomputes this table whenever (h, w) differs from the training size and
        # uses a precomputed copy of the same function's output otherwise: always computing
        # it gives the same numbers and keeps h and w dynamic in the exported graph.
        pos = get_2d_sincos_pos_embed(
            x.shape[-1], (h, w), base_size=self.base_size,
            interpolation_scale=self.interpolation_scale, device=x.device, output_type="pt",
        )
        # diffusers adds its table in the model's dtype (a buffer cast with the model): the same rounding here.
        x = x + pos.to(x.dtype).unsqueeze(0)
        temb, embedded_timestep = self.adaln_single(
            timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            batch_size=b, hidden_dtype=x.dtype,
        )  # (B, 6D), (B, D)
        text = self.caption_projection(encoder_hidden_states)  # (B, T, D)
        hidden = x.reshape(b, f, h, w, x.shape[-1])  # (B, F, h, w, D)
        return hidden, temb, embedded_timestep, text


class LatteLayer(nn.Module):
    """One spatial block, the frame/token rearrange, one temporal block.

    Outputs ``(spatial, hidden)``: the spatial block's output (a Foresight probe) and the
    layer's output (the second probe and the state carried to the next layer).
    """

    def __init__(self, model, index: int):
        super().__init__()
        self.spatial = model.transformer_blocks[index]
        self.temporal = model.temporal_transformer_blocks[index]
        # Latte adds the temporal position embedding once, before the first temporal block.
        self.add_temp_pos = index == 0
        if self.add_temp_pos:
            self.register_buffer("temp_pos_embed", model.temp_pos_embed.clone(), persistent=False)

    def forward(self, hidden, temb, text):
        b, f, h, w, d = hidden.shape
        n = h * w
        x = hidden.reshape(b * f, n, d)  # (B*F, N, D)
        temb_spatial = repeat_rows(temb, f)  # (B*F, 6D)
        text_spatial = repeat_rows(text, f)  # (B*F, T, D)
        x = self.spatial(x, None, text_spatial, None, temb_spatial, None, None)
        spatial = x.reshape(b, f, h, w, d)
        x = x.reshape(b, f, n, d).permute(0, 2, 1, 3).reshape(b * n, f, d)  # (B*N, F, D)
        if self.add_temp_pos:
            x = x + self.temp_pos_embed[:, :f].to(x.dtype)
        temb_temporal = repeat_rows(temb, n)  # (B*N, 6D)
        x = self.temporal(x, None, None, None, temb_temporal, None, None)
        x = x.reshape(b, n, f, d).permute(0, 2, 1, 3).reshape(b, f, h, w, d)  # (B, F, h, w, D)
        return spatial, x


class LatteHead(nn.Module):
    """Final adaLN modulation, projection to patches, unpatchify to ``(B, C_out, F, H, W)``."""

    def __init__(self, model):
        super().__init__()
        self.norm_out = model.norm_out
        self.scale_shift_table = model.scale_shift_table
        self.proj_out = model.proj_out
        self.patch_size = model.config.patch_size
        self.out_channels = model.out_channels

    def forward(self, hidden, embedded_timestep):
        b, f, h, w, d = hidden.shape
        p, c = self.patch_size, self.out_channels
        x = hidden.reshape(b * f, h * w, d)  # (B*F, N, D)
        et = repeat_rows(embedded_timestep, f)  # (B*F, D)
        shift, scale = (self.scale_shift_table[None] + et[:, None]).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)  # (B*F, N, p*p*C)
        x = x.reshape(b, f, h, w, p, p, c)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, F, h, p, w, p)
        return x.reshape(b, c, f, h * p, w * p)


def load_transformer(folder: str | Path):
    """The transformer from a local diffusers ``transformer/`` folder (never the network)."""
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel.from_pretrained(str(folder), local_files_only=True)


def part_modules(model, pipeline=None) -> dict[str, nn.Module]:
    """``{"stem", "layer_000", ..., "head"}`` over one transformer (the parts share its weights)."""
    layers = {f"layer_{i:03d}": LatteLayer(model, i) for i in range(model.config.num_layers)}
    return {"stem": LatteStem(model), **layers, "head": LatteHead(model)}
