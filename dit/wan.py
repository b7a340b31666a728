"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``) as stem, layers and head modules.

Layers carry one tensor: the video tokens, laid out as the token grid ``(B, F, h, w, D)`` (the
order diffusers' ``flatten(2).transpose(1, 2)`` gives them). It is the Foresight probe. The
projected text ``(B, T, D)`` and the timestep projection ``(B, 6, D)`` are per-step constants
from the stem. Each layer computes the rotary tables for its grid with the model's own
``WanRotaryPosEmbed`` (float64, as diffusers does once per forward), so no float64 tensor
crosses a part boundary. Stacked, the parts equal the diffusers model's forward bit for bit.

With per-token timesteps (Wan 2.2 TI2V-5B, ``expand_timesteps``) the stem takes one timestep per
token on the token grid ``(B, F, h, w)`` and the timestep embedding and projection are per token,
``(B, F, h, w, D)`` and ``(B, F, h, w, 6, D)``: what diffusers computes from ``(B, F*h*w)``
timesteps, on the grid. Image conditioning (I2V) is not supported by these modules.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

FAMILY = "wan"


class WanStem(nn.Module):
    """Patch embedding, timestep embedding and projection, text projection."""

    def __init__(self, model, per_token: bool = False):
        super().__init__()
        self.patch_embedding, self.condition_embedder = model.patch_embedding, model.condition_embedder
        self.per_token = per_token

    def forward(self, latents, timestep, encoder_hidden_states):
        x = self.patch_embedding(latents)  # (B, D, F, h, w)
        hidden = x.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, h, w, D): diffusers' token order
        if not self.per_token:
            temb, timestep_proj, text, _ = self.condition_embedder(timestep, encoder_hidden_states, None)
            return hidden, text, temb, timestep_proj.unflatten(1, (6, -1))  # (B, 6, D)
        grid = timestep.shape  # (B, F, h, w): one timestep per token
        temb, timestep_proj, text, _ = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=grid[1] * grid[2] * grid[3])
        return hidden, text, temb.unflatten(1, grid[1:]), timestep_proj.unflatten(2, (6, -1)).unflatten(1, grid[1:])


class WanLayer(nn.Module):
    """One ``WanTransformerBlock`` on the token grid; its rotary tables from the grid's size."""

    def __init__(self, model, index: int):
        super().__init__()
        self.block = model.blocks[index]
        self.rope = model.rope
        self.patch_size = tuple(model.config.patch_size)

    def forward(self, hidden, text, timestep_proj):
        b, f, h, w, d = hidden.shape
        pt, ph, pw = self.patch_size
        # WanRotaryPosEmbed reads only the shape of the latents it is given.
        rotary = self.rope(hidden.new_empty((1, 0, f * pt, h * ph, w * pw)))
        if timestep_proj.dim() == 6:  # per token (B, F, h, w, 6, D) -> (B, S, 6, D), as diffusers passes it
            timestep_proj = timestep_proj.flatten(1, 3)
        out = self.block(hidden.reshape(b, f * h * w, d), text, timestep_proj, rotary)
        return out.reshape(b, f, h, w, d)


class WanHead(nn.Module):
    """Output norm modulated by the timestep embedding, projection, unpatchify to ``(B, C, F, H, W)``."""

    def __init__(self, model):
        super().__init__()
        self.norm_out, self.proj_out, self.scale_shift_table = model.norm_out, model.proj_out, model.scale_shift_table
        self.patch_size = tuple(model.config.patch_size)

    def forward(self, hidden, temb):
        b, f, h, w, d = hidden.shape
        pt, ph, pw = self.patch_size
        if temb.dim() == 5:  # per token (B, F, h, w, D): diffusers' (B, S, D) branch
            shift, scale = (self.scale_shift_table.unsqueeze(0) + temb.flatten(1, 3).unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = hidden.reshape(b, f * h * w, d)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x).reshape(b, f, h, w, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def load_transformer(folder: str | Path):
    """The transformer from a local diffusers ``transformer/`` folder (never the network)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(str(folder), local_files_only=True)


def part_modules(model, pipeline=None) -> dict[str, nn.Module]:
    """``{"stem", "layer_000", ..., "head"}`` over one transformer (the parts share its weights).
    ``pipeline``: the engines' pipeline facts; ``expand_timesteps`` (TI2V) makes the timesteps per token."""
    per_token = bool((pipeline or {}).get("expand_timesteps"))
    layers = {f"layer_{i:03d}": WanLayer(model, i) for i in range(model.config.num_layers)}
    return {"stem": WanStem(model, per_token), **layers, "head": WanHead(model)}
