"""CogVideoX 1.0 (diffusers ``CogVideoXTransformer3DModel``) as stem, layers and head modules.

Layers carry two tensors between them: the video tokens ``(B, F, h, w, D)`` and the text tokens
``(B, T, D)``. Rotary configurations (5B) take cos/sin tables ``(F, h, w, head_dim)`` in every
layer; sin-cos configurations (2B) take the 3D table ``(F, h, w, D)`` in the stem. Stacked, the
parts equal the diffusers model's forward bit for bit.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

FAMILY = "cogvideox"


def _tokens(x):  # (B, F, h, w, D) -> (B, F*h*w, D)
    return x.flatten(1, 3)


def _grid(x, like):  # (B, F*h*w, D) -> like's (B, F, h, w, D)
    return x.reshape(like.shape[0], like.shape[1], like.shape[2], like.shape[3], x.shape[-1])


class CogVideoXStem(nn.Module):
    """Timestep embedding, text projection and patch embedding (text and video tokens apart);
    with ``pos_embedding`` (sin-cos configurations) the table is added to the video tokens."""

    def __init__(self, model):
        super().__init__()
        self.time_proj, self.time_embedding = model.time_proj, model.time_embedding
        self.text_proj, self.proj = model.patch_embed.text_proj, model.patch_embed.proj
        self.patch_size = model.config.patch_size

    def forward(self, latents, timestep, encoder_hidden_states, pos_embedding=None):
        b, f, c, hh, ww = latents.shape
        emb = self.time_embedding(self.time_proj(timestep).to(latents.dtype))
        text = self.text_proj(encoder_hidden_states)  # (B, T, D)
        video = self.proj(latents.reshape(b * f, c, hh, ww))  # (B*F, D, h, w)
        video = video.reshape(b, f, video.shape[1], video.shape[2], video.shape[3]).permute(0, 1, 3, 4, 2)
        if pos_embedding is not None:
            # diffusers adds a joint table whose text rows are zero: text + 0 is text, exactly.
            video = video + pos_embedding.to(video.dtype)
        return video, text, emb  # video (B, F, h, w, D)


class CogVideoXLayer(nn.Module):
    """One ``CogVideoXBlock``: ``(hidden, text)`` in, ``(hidden_out, text_out)`` out; the rotary
    tables are inputs in rotary configurations only."""

    def __init__(self, model, index: int):
        super().__init__()
        self.block = model.transformer_blocks[index]

    def forward(self, hidden, text, temb, rotary_cos=None, rotary_sin=None):
        rotary = None
        if rotary_cos is not None:
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


def load_transformer(folder: str | Path):
    """The transformer from a local diffusers ``transformer/`` folder (never the network)."""
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(str(folder), local_files_only=True)


def part_modules(model, pipeline=None) -> dict[str, nn.Module]:
    """``{"stem", "layer_000", ..., "head"}`` over one transformer (the parts share its weights)."""
    layers = {f"layer_{i:03d}": CogVideoXLayer(model, i) for i in range(model.config.num_layers)}
    return {"stem": CogVideoXStem(model), **layers, "head": CogVideoXHead(model)}
