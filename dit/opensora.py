"""Open-Sora 1.2 (our :class:`~dit.stdit3.STDiT3`) as stem, layers and head modules.

Layout between parts: ``(B, F, h, w, C)`` tokens. The caption mask travels as float (> 0.5 is a
valid token), the form every runtime buffer and backend handles.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

FAMILY = "opensora"


class OpenSoraStem(nn.Module):
    """Latents, timestep, T5 caption + mask, fps and pixel size -> tokens and modulations."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, timestep, caption, caption_mask, fps, height, width):
        out = self.model.stem(latents, timestep, caption[:, None], caption_mask > 0.5, fps=fps, height=height,
                              width=width)
        b, f, _, c = out.x.shape
        _, ph, pw = self.model.config.patch_size
        hidden = out.x.reshape(b, f, latents.shape[3] // ph, latents.shape[4] // pw, c)
        return hidden, out.t_mlp, out.t, out.y


class OpenSoraLayer(nn.Module):
    """``spatial_blocks[i]`` then ``temporal_blocks[i]``; returns ``(spatial, hidden_out)``."""

    def __init__(self, model, index: int):
        super().__init__()
        self.layer = model.layer(index)

    def forward(self, hidden, t_mlp, y, caption_mask):
        b, f, h, w, c = hidden.shape
        spatial, out = self.layer(hidden.reshape(b, f, h * w, c), t_mlp, y, caption_mask > 0.5)
        return spatial.reshape(b, f, h, w, c), out.reshape(b, f, h, w, c)


class OpenSoraHead(nn.Module):
    """Final adaLN layer and unpatchify: ``(B, F, h, w, C)`` -> ``(B, 8, F, H, W)`` fp32."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden, t):
        b, f, h, w, c = hidden.shape
        _, ph, pw = self.model.config.patch_size
        return self.model.head(hidden.reshape(b, f, h * w, c), t, (f, h * ph, w * pw))


def load_transformer(folder: str | Path):
    """Our STDiT3 from a ``transformer/`` folder (config.json + weights), strictly keyed."""
    from .stdit3 import load_stdit3

    return load_stdit3(Path(folder))


def part_modules(model, pipeline=None) -> dict[str, nn.Module]:
    """``{"stem", "layer_000", ..., "head"}`` over one STDiT3 (the parts share its weights)."""
    layers = {f"layer_{i:03d}": OpenSoraLayer(model, i) for i in range(model.config.depth)}
    return {"stem": OpenSoraStem(model), **layers, "head": OpenSoraHead(model)}
