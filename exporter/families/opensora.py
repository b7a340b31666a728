"""Open-Sora 1.2 (STDiT3) cut into exportable parts: stem, one part per layer (spatial block then
temporal block, both outputs Foresight probes), head.

Not registered in ``get_family`` yet: the runtime has no Open-Sora pipeline (T5 with the
aesthetic-score suffix, the y_embedding null caption, the rectified-flow loop, the Open-Sora
VAE), so ``--model opensora`` would export engines nothing can run. What is here is the split
and its symbolic I/O, exported and validated against PyTorch at two shapes by the tests.

Layout between parts: ``(B, F, h, w, C)`` tokens, as Latte's, so the head reads the token grid
from its input's shape. The caption mask travels as float (1 = valid token; > 0.5 is valid),
the form every runtime buffer and backend already handles.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import IOSpec, PartSpec, grid_dims


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


def parts(model) -> list[PartSpec]:
    """The stem, ``depth`` layers and the head of an ``STDiT3``, with symbolic I/O (B batch, F latent
    frames, h/w token grid, H/W latent size = grid x patch, T caption tokens)."""
    cfg = model.config
    c, c_text = cfg.hidden_size, cfg.caption_channels
    hidden = ["B", "F", "h", "w", c]
    mask = IOSpec("caption_mask", ["B", "T"], low=0.3, high=1.3)  # random validation masks: ~80% valid
    stem = PartSpec(
        "stem", OpenSoraStem(model),
        inputs=[IOSpec("latents", ["B", cfg.in_channels, "F", "H", "W"]),
                IOSpec("timestep", ["B"], low=0.0, high=1000.0, fixed_dtype=True),
                IOSpec("caption", ["B", "T", c_text]), mask,
                IOSpec("fps", ["B"], low=24.0, high=24.0, fixed_dtype=True),
                IOSpec("height", ["B"], low=240.0, high=720.0, fixed_dtype=True),
                IOSpec("width", ["B"], low=240.0, high=1280.0, fixed_dtype=True)],
        outputs=[IOSpec("hidden", hidden), IOSpec("t_mlp", ["B", 6 * c]), IOSpec("t", ["B", c]),
                 IOSpec("y", ["B", "T", c])],
    )
    layers = [
        PartSpec(f"layer_{i:03d}", OpenSoraLayer(model, i),
                 inputs=[IOSpec("hidden", hidden), IOSpec("t_mlp", ["B", 6 * c]), IOSpec("y", ["B", "T", c]), mask],
                 outputs=[IOSpec("spatial", hidden), IOSpec("hidden_out", hidden)])
        for i in range(cfg.depth)
    ]
    head = PartSpec("head", OpenSoraHead(model), inputs=[IOSpec("hidden", hidden), IOSpec("t", ["B", c])],
                    outputs=[IOSpec("noise_pred", ["B", cfg.out_channels, "F", "H", "W"])])
    return [stem, *layers, head]


def dims(model, max_frames: int = 16, max_grid: int = 16, max_text: int | None = None) -> dict:
    """Symbol ranges for export (the CFG batch 2 is the opt batch)."""
    _, ph, pw = model.config.patch_size
    return grid_dims((2, 4, max_frames), max_grid, max_text or model.config.model_max_length, (ph, pw))


def stacked(parts_: list[PartSpec], inputs: dict) -> torch.Tensor:
    """Run the parts in order, as the runtime does with policy none (for tests and references)."""
    stem, *layers, head = parts_
    with torch.no_grad():
        hidden, t_mlp, t, y = stem.module(*(inputs[s.name] for s in stem.inputs))
        for layer in layers:
            _, hidden = layer.module(hidden, t_mlp, y, inputs["caption_mask"])
        return head.module(hidden, t)
