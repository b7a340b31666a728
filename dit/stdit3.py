"""Open-Sora 1.2 STDiT3, written here with the released checkpoint's parameter names.

The facts (config, every key and shape, forward semantics) are those of the released
``opensora/models/stdit/stdit3.py`` (v1.2.0); a user's local copy of hpcai-tech
"OpenSora-STDiT-v3" loads with strict key matching (:func:`load_stdit3`).

Between the parts the hidden state travels as ``(B, T, S, C)``: batch (CFG doubles it),
latent frames, tokens per frame (``S = H' * W'``, row-major), hidden size. That is the
official ``B (T S) C`` layout with the frame axis made explicit, so a spatial block is a
reshape to ``(B*T, S, C)`` and a temporal block a transpose to ``(B*S, T, C)``.

The model is built from three pieces, and ``forward`` is literally
``stem -> layer(0) .. layer(depth-1) -> head``, so the exporter's split is exact by
construction:

- :meth:`STDiT3.stem`: patch + 2D sin-cos position embedding, timestep/fps embedding and
  ``t_block``, caption projection and its key-padding mask;
- :meth:`STDiT3.layer`: ``spatial_blocks[i]`` then ``temporal_blocks[i]``; both outputs
  are Foresight probes;
- :meth:`STDiT3.head`: final adaLN layer, unpatchify, crop.

Captions. The official code packs every sample's valid caption tokens into one sequence
and uses a block-diagonal attention bias (xformers). Here the caption stays padded,
``(B, L, C)``, and cross-attention gets a boolean key-padding mask ``(B, 1, 1, L)``: each
video token's softmax runs over exactly its own sample's valid tokens, the same numbers as
the packed form, with static shapes and no data-dependent packing (export-friendly). A
sample needs at least one valid token (T5 always emits EOS); a fully masked row would give
NaN where the packed form gives nothing to attend to.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dit.errors import ModelError

FREQUENCY_EMBEDDING_SIZE = 256  # timestep / fps sinusoid width
ROPE_THETA = 10000.0
POS_THETA = 10000.0
NORM_EPS = 1e-6


class CheckpointMismatchError(ModelError, ValueError):
    """A checkpoint's keys or shapes do not match the STDiT3 config it is loaded into.

    A ``ValueError`` for callers of :func:`load_stdit3`, a ``ModelError`` so the CLIs print
    it without a traceback.
    """


@dataclass(frozen=True)
class STDiT3Config:
    """STDiT3 hyper-parameters; the defaults are the released STDiT3-XL/2."""

    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    pred_sigma: bool = True  # out channels = 2 * in_channels; only the first half is used
    mlp_ratio: float = 4.0
    caption_channels: int = 4096  # T5-v1.1-XXL
    model_max_length: int = 300  # caption tokens; rows of the null caption y_embedding
    qk_norm: bool = True
    input_sq_size: int = 512  # position-embedding scale = sqrt(height * width) / input_sq_size

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        for name in ("depth", "hidden_size", "num_heads", "in_channels", "caption_channels",
                     "model_max_length", "input_sq_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
            elif self.head_dim % 2:
                problems.append(f"head dim {self.head_dim} must be even (RoPE rotates pairs): change num_heads")
            if self.hidden_size % 4:
                problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 (2D sin-cos position embedding)")
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if problems:
            raise ValueError("invalid STDiT3Config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def xl2(cls) -> "STDiT3Config":
        """The released STDiT3-XL/2 (hpcai-tech/OpenSora-STDiT-v3), ~1.21B parameters."""
        return cls(depth=28, hidden_size=1152, num_heads=16, patch_size=(1, 2, 2), in_channels=4,
                   pred_sigma=True, mlp_ratio=4.0, caption_channels=4096, model_max_length=300,
                   qk_norm=True, input_sq_size=512)

    @classmethod
    def from_dict(cls, d: Mapping) -> "STDiT3Config":
        """From a ``config.json``; keys this runtime does not use (``enable_flash_attn``,
        ``drop_path``, ``model_type``, ...) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], input_sq_size: int = 512) -> "STDiT3Config":
        """Read the config off a checkpoint's shapes (for a bare weights file with no config.json)."""
        try:
            proj = sd["x_embedder.proj.weight"]  # (C, in, pt, ph, pw)
            hidden, in_channels, patch = proj.shape[0], proj.shape[1], tuple(proj.shape[2:])
            depth = sum(1 for k in sd if k.startswith("spatial_blocks.") and k.endswith(".scale_shift_table"))
            qk_norm = "spatial_blocks.0.attn.q_norm.weight" in sd
            if qk_norm:
                head_dim = sd["spatial_blocks.0.attn.q_norm.weight"].shape[0]
            elif "rope.freqs" in sd:
                head_dim = 2 * sd["rope.freqs"].shape[0]
            else:
                raise KeyError("spatial_blocks.0.attn.q_norm.weight")
            out = sd["final_layer.linear.weight"].shape[0] // math.prod(patch)
            return cls(
                depth=depth, hidden_size=hidden, num_heads=hidden // head_dim, patch_size=patch,
                in_channels=in_channels, pred_sigma=out == 2 * in_channels,
                mlp_ratio=sd["spatial_blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                model_max_length=sd["y_embedder.y_embedding"].shape[0], qk_norm=qk_norm,
                input_sq_size=input_sq_size,
            )
        except KeyError as e:
            raise CheckpointMismatchError(
                f"cannot read an STDiT3 config off this checkpoint: key {e.args[0]!r} is missing. "
                f"Pass config=STDiT3Config(...) or load a folder with its config.json"
            ) from None


# --------------------------------------------------------------------------- embeddings


def timestep_sinusoid(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim) fp32: ``cat(cos(t f), sin(t f))``, f_k = exp(-ln(max_period) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(dim: int, h: int, w: int, scale: torch.Tensor, base_size) -> torch.Tensor:
    """The fp32 2D sin-cos table of one frame, ``(h*w, dim)``, tokens row-major.

    Row/col positions are ``i / scale * (base_size / n)``; a token's embedding is
    ``[sin(col f), cos(col f), sin(row f), cos(row f)]`` (the first half encodes the
    column), ``f = 1 / 10000^(arange(0, dim/2, 2) / (dim/2))``. ``scale`` is a 0-d tensor
    so that it stays a graph input when exported.
    """
    half = dim // 2
    device = scale.device
    inv_freq = 1.0 / (POS_THETA ** (torch.arange(0, half, 2, device=device).float() / half))  # (dim/4,)
    rows = torch.arange(h, device=device) / scale * (base_size / h)  # (h,)
    cols = torch.arange(w, device=device) / scale * (base_size / w)  # (w,)
    rows = rows[:, None].expand(h, w).reshape(-1)  # (h*w,) row index of each token
    cols = cols[None, :].expand(h, w).reshape(-1)  # (h*w,) col index of each token
    col_f, row_f = cols[:, None] * inv_freq[None], rows[:, None] * inv_freq[None]  # (h*w, dim/4)
    return torch.cat([torch.sin(col_f), torch.cos(col_f), torch.sin(row_f), torch.cos(row_f)], dim=-1)


class TimestepEmbedder(nn.Module):
    """256-d sinusoid -> Linear, SiLU, Linear (keys ``mlp.0``, ``mlp.2``); also the fps embedder."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_sinusoid(t).to(dtype))  # (B, C)


class Mlp(nn.Module):
    """timm's Mlp: fc1, GELU (tanh), fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 features -> hidden size; ``y_embedding`` is the learned null caption (CFG's unconditional input)."""

    def __init__(self, caption_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)

    def forward(self, y):
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    """Zero-pad T, H, W at the end to multiples of the patch, then Conv3d with kernel = stride = patch."""

    def __init__(self, patch_size, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _, _, t, h, w = x.shape
        pt, ph, pw = self.patch_size
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))
        return self.proj(x)  # (B, C, T', H', W')


# --------------------------------------------------------------------------- attention


class RMSNorm(nn.Module):
    """LlamaRMSNorm: normalise in fp32, cast back, then scale (one weight shared by all heads)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """rotary-embedding-torch's RotaryEmbedding as STDiT3 uses it; owns ``rope.freqs``.

    ``freqs`` is a (non-trainable) parameter in the release, hence a state_dict key
    [unverified: the spec could not read the checkpoint file; :func:`load_stdit3` accepts
    it missing and recomputes it].
    """

    def __init__(self, dim: int, theta: float = ROPE_THETA):
        super().__init__()
        self.freqs = nn.Parameter(default_rope_freqs(dim, theta), requires_grad=False)  # (dim/2,)

    def rotate_queries_or_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (..., n, d)`` along its sequence axis -2 by positions 0..n-1.

        Interleaved pairs: ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`` with angle
        ``pos * freqs[j]`` for pair j, i.e. ``x * cos + rotate_half(x) * sin`` with the
        frequencies repeated ``[f0, f0, f1, f1, ...]`` — written per pair, which is the same
        arithmetic and needs no repeat_interleave in the exported graph.
        """
        n, d = x.shape[-2], x.shape[-1]
        angles = torch.arange(n, device=x.device, dtype=self.freqs.dtype)[:, None] * self.freqs[None]  # (n, d/2)
        cos, sin = angles.cos(), angles.sin()
        pairs = x.reshape(*x.shape[:-1], d // 2, 2)  # (..., n, d/2, 2)
        x0, x1 = pairs.unbind(-1)
        out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (..., n, d/2, 2)
        return out.reshape(x.shape).to(x.dtype)


def default_rope_freqs(dim: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """``1 / theta^(2j / dim)`` for j < dim/2."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


class Attention(nn.Module):
    """Self-attention: fused qkv, RMSNorm on q and k, optional RoPE, SDPA, proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: Callable | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # rows: q, k, v
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A bound method of the model's one RotaryEmbedding, as in the release: not a
        # submodule, so the blocks add no state_dict keys of their own for it.
        self.rope = rope

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, b, H, n, d)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        # Default scale d^-0.5. The release's eager path softmaxes in fp32; SDPA's fused
        # kernels accumulate the softmax in fp32 too, so fp16/bf16 runs agree to rounding.
        out = F.scaled_dot_product_attention(q, k, v)  # (b, H, n, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MultiHeadCrossAttention(nn.Module):
    """Video tokens attend to their own sample's valid caption tokens (q_linear, kv_linear rows k then v)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, y_mask):
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (b, H, n, d)
        kv = self.kv_linear(y).view(b, y.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # (b, H, L, d)
        # Key-padding mask in place of the release's packed block-diagonal bias: same softmax support.
        # Expanded over the queries: ONNX Runtime's Attention kernel does not broadcast a mask over them.
        mask = y_mask[:, None, None, :].expand(b, 1, n, y.shape[1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, H, n, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


# --------------------------------------------------------------------------- blocks


def modulation(table: torch.Tensor, t: torch.Tensor, x_mask=None, t0=None):
    """adaLN-single: rows of ``table (n, C) + t``, one ``(B, T|1, 1, C)`` tensor per row.

    ``t`` is ``(B, n*C)`` (t_mlp, one row each) or ``(B, C)`` (added to every row). With
    ``x_mask (B, T)``, frames where it is False take the rows of ``t0`` instead. Selecting
    the modulation per frame before applying it gives exactly the release's
    ``torch.where`` over the two modulated tensors (the ops after it are elementwise).
    """
    b, c = t.shape[0], table.shape[1]
    mod = table[None] + t.view(b, -1, c)  # (B, n, C)
    if x_mask is None:
        mod = mod[:, None]  # (B, 1, n, C)
    else:
        mod0 = table[None] + t0.view(b, -1, c)
        mod = torch.where(x_mask[:, :, None, None], mod[:, None], mod0[:, None])  # (B, T, n, C)
    return mod.unsqueeze(3).unbind(2)  # n x (B, T|1, 1, C)


class STDiT3Block(nn.Module):
    """One spatial (attention over the S tokens of a frame) or temporal (over the T frames of a site) block."""

    def __init__(self, config: STDiT3Config, temporal: bool, rope: Callable | None = None):
        super().__init__()
        c = config.hidden_size
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(c, eps=NORM_EPS, elementwise_affine=False)
        self.attn = Attention(c, config.num_heads, config.qk_norm, rope=rope if temporal else None)
        self.cross_attn = MultiHeadCrossAttention(c, config.num_heads)
        self.norm2 = nn.LayerNorm(c, eps=NORM_EPS, elementwise_affine=False)
        self.mlp = Mlp(c, config.mlp_hidden_size, c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def forward(self, x, t_mlp, y, y_mask, x_mask=None, t0_mlp=None):
        b, t, s, c = x.shape  # (B, T, S, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(
            self.scale_shift_table, t_mlp, x_mask, t0_mlp)
        h = self.norm1(x) * (1 + scale_msa) + shift_msa
        if self.temporal:
            h = self.attn(h.transpose(1, 2).reshape(b * s, t, c))  # (B*S, T, C)
            h = h.reshape(b, s, t, c).transpose(1, 2)  # (B, T, S, C)
        else:
            h = self.attn(h.reshape(b * t, s, c)).reshape(b, t, s, c)  # via (B*T, S, C)
        x = x + gate_msa * h
        # Cross-attention: no norm, no modulation, no gate.
        x = x + self.cross_attn(x.reshape(b, t * s, c), y, y_mask).reshape(b, t, s, c)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class T2IFinalLayer(nn.Module):
    """adaLN with the un-projected t (no SiLU), then linear to ``prod(patch) * out_channels``."""

    def __init__(self, config: STDiT3Config):
        super().__init__()
        c = config.hidden_size
        self.norm_final = nn.LayerNorm(c, eps=NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(c, math.prod(config.patch_size) * config.out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, c) / c**0.5)

    def forward(self, x, t, x_mask=None, t0=None):
        shift, scale = modulation(self.scale_shift_table, t)
        out = self.norm_final(x) * (1 + scale) + shift
        if x_mask is not None:
            # [unverified, not in the spec] The official T2IFinalLayer normalises the
            # *already modulated* tensor for its t0 branch (norm_final(x) after x was
            # reassigned); reproduced so masked frames match the release. With x_mask
            # all True (the text-to-video path) this branch is discarded.
            shift0, scale0 = modulation(self.scale_shift_table, t0)
            out0 = self.norm_final(out) * (1 + scale0) + shift0
            out = torch.where(x_mask[:, :, None, None], out, out0)
        return self.linear(out)


class STDiT3Layer(nn.Module):
    """``spatial_blocks[i]`` then ``temporal_blocks[i]``: returns ``(spatial, out)``, both probes.

    Shares its parameters with the model; ``rope`` is registered here too so an exported
    layer owns ``rope.freqs``.
    """

    def __init__(self, spatial: STDiT3Block, temporal: STDiT3Block, rope: RotaryEmbedding):
        super().__init__()
        self.spatial, self.temporal, self.rope = spatial, temporal, rope

    def forward(self, x, t_mlp, y, y_mask, x_mask=None, t0_mlp=None):
        spatial = self.spatial(x, t_mlp, y, y_mask, x_mask, t0_mlp)  # (B, T, S, C)
        return spatial, self.temporal(spatial, t_mlp, y, y_mask, x_mask, t0_mlp)


class StemOutput(NamedTuple):
    x: torch.Tensor  # (B, T, S, C) patch tokens + position embedding
    t_mlp: torch.Tensor  # (B, 6C) block modulation
    t: torch.Tensor  # (B, C) final-layer modulation
    y: torch.Tensor  # (B, L, C) projected caption, padded
    y_mask: torch.Tensor  # (B, L) bool, True = valid caption token
    t0_mlp: torch.Tensor | None = None  # timestep-0 counterparts, only with x_mask
    t0: torch.Tensor | None = None


# --------------------------------------------------------------------------- model


class STDiT3(nn.Module):
    def __init__(self, config: STDiT3Config | None = None):
        super().__init__()
        self.config = config = config or STDiT3Config.xl2()
        c = config.hidden_size
        self.rope = RotaryEmbedding(config.head_dim)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(config, temporal=False) for _ in range(config.depth))
        rope = self.rope.rotate_queries_or_keys
        self.temporal_blocks = nn.ModuleList(STDiT3Block(config, temporal=True, rope=rope) for _ in range(config.depth))
        self.final_layer = T2IFinalLayer(config)
        # PyTorch's default init (not the release's zero-init of gates and projections):
        # weights are always loaded, and non-zero random weights make every path visible in tests.
        # Training from scratch calls initialize_weights() (the release's scheme).

    def initialize_weights(self) -> "STDiT3":
        """The release's initialisation for training from scratch: Xavier-uniform linear layers with
        zero bias; the fps embedder's output layer zero and its input layer N(0, 0.02); every temporal
        block's self-attention, cross-attention and MLP output projections zero, so the model starts
        as a per-frame image model and the temporal blocks grow in from the identity."""
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        for block in self.temporal_blocks:
            for proj in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(proj.weight)
        return self

    def stem(self, x, timestep, y, mask=None, *, fps, height, width, x_mask=None) -> StemOutput:
        """Latents, timestep, T5 caption and conditioning -> the layer inputs.

        ``x (B, in, T, H, W)``, ``timestep (B,)`` in [0, 1000], ``y (B, 1, L, caption)``,
        ``mask (B', L)`` with B' dividing B (a prompt mask is tiled over the CFG batch, as
        the release does) or None (all tokens valid), ``fps/height/width (B,)`` (pixels).
        """
        dtype = self.x_embedder.proj.weight.dtype
        b, _, _, hx, wx = x.shape
        if y.dim() != 4 or y.shape[0] != b or y.shape[1] != 1:
            raise ValueError(f"y must be (B={b}, 1, L, {self.config.caption_channels}), got {tuple(y.shape)}")
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        fps, height, width = (torch.as_tensor(v, device=x.device).reshape(-1).expand(b) for v in (fps, height, width))

        # Position embedding: fp32, scale from the first sample's pixel size.
        _, ph, pw = self.config.patch_size
        h, w = -(-hx // ph), -(-wx // pw)  # token grid after padding
        s = h * w
        # round(sqrt(S)) as tensor ops (half to even, as Python's round): an exported graph keeps S symbolic.
        base_size = torch.round(torch.sqrt(torch.ones((), dtype=torch.float32, device=x.device) * s))
        scale = torch.sqrt(height[0].float() * width[0].float()) / self.config.input_sq_size
        pos = pos_embed_2d(self.config.hidden_size, h, w, scale, base_size)  # (S, C)

        # Timestep + fps -> adaLN-single inputs.
        temb = self.t_embedder(timestep, dtype) + self.fps_embedder(fps, dtype)  # (B, C)
        t_mlp = self.t_block(temb)  # (B, 6C)
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype) + self.fps_embedder(fps, dtype)
            t0_mlp = self.t_block(t0)

        # Caption: project all L tokens; the mask says which ones each sample attends to.
        y = self.y_embedder(y).squeeze(1)  # (B, L, C)
        if mask is None:
            y_mask = torch.ones(b, y.shape[1], dtype=torch.bool, device=y.device)
        else:
            mask = mask.reshape(mask.shape[0], -1)
            if mask.shape[0] != b:
                mask = mask.repeat(b // mask.shape[0], 1)  # tiled, as the release does for CFG
            y_mask = mask != 0  # (B, L)

        x = self.x_embedder(x)  # (B, C, T, H', W')
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T, S, C)
        x = x + pos.to(x.dtype)  # same table for every frame; no temporal position embedding
        return StemOutput(x, t_mlp, temb, y, y_mask, t0_mlp, t0)

    def layer(self, i: int) -> STDiT3Layer:
        return STDiT3Layer(self.spatial_blocks[i], self.temporal_blocks[i], self.rope)

    def head(self, x, t, size, x_mask=None, t0=None) -> torch.Tensor:
        """``x (B, T, S, C)`` -> ``(B, out, tx, hx, wx)`` fp32, cropped to the unpadded latent ``size``."""
        tx, hx, wx = size
        pt, ph, pw = self.config.patch_size
        h, w = -(-hx // ph), -(-wx // pw)
        b, nt, s, _ = x.shape
        co = self.config.out_channels
        if s != h * w:
            raise ValueError(f"head got {s} tokens per frame but size {tuple(size)} makes a {h}x{w} token grid")
        x = self.final_layer(x, t, x_mask, t0)  # (B, T, S, pt*ph*pw*out)
        x = x.reshape(b, nt, h, w, pt, ph, pw, co)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, co, nt * pt, h * ph, w * pw)  # B C (T pt) (H ph) (W pw)
        return x[:, :, :tx, :hx, :wx].float()

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None):
        """``(B, in, T, H, W)`` latents -> ``(B, out, T, H, W)`` fp32; channels ``:in`` are the velocity."""
        if fps is None or height is None or width is None:
            raise ValueError("STDiT3 needs fps, height and width (pixels), each a (B,) tensor")
        s = self.stem(x, timestep, y, mask, fps=fps, height=height, width=width, x_mask=x_mask)
        h = s.x
        for i in range(self.config.depth):
            _, h = self.layer(i)(h, s.t_mlp, s.y, s.y_mask, x_mask, s.t0_mlp)
        return self.head(h, s.t, tuple(x.shape[2:]), x_mask, s.t0)

    def null_caption(self, batch_size: int, length: int | None = None) -> torch.Tensor:
        """The learned null caption as ``(B, 1, L, caption)``: CFG's unconditional ``y``.

        Paired with its prompt's mask, it attends to the first L_i rows, as in the release.
        """
        emb = self.y_embedder.y_embedding[:length]
        return emb[None, None].expand(batch_size, 1, *emb.shape)


def cfg_model_fn(model: STDiT3, y, mask, *, fps, height, width) -> Callable:
    """``f(z_in (2B, ...), t_in (2B,))`` for :class:`dit.rflow.RFlowSampler`:
    the prompt's caption in the first half of the batch, the null caption in the second,
    both with the prompt's mask (the eager reference for the runtime's CFG batch)."""
    b = y.shape[0]
    y_in = torch.cat([y, model.null_caption(b, y.shape[2]).to(y.dtype)])
    mask_in = None if mask is None else torch.cat([mask, mask])
    extras = {k: torch.as_tensor(v).reshape(-1).expand(b).repeat(2) for k, v in
              (("fps", fps), ("height", height), ("width", width))}

    def fn(z_in, t_in):
        return model(z_in, t_in, y_in, mask_in, **extras)

    return fn


# --------------------------------------------------------------------------- loading

WEIGHT_FILES = (
    "model.safetensors", "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin", "diffusion_pytorch_model.bin",
)


def _read_weights(path: Path) -> dict:
    if path.name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
        from safetensors.torch import load_file

        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(load_file(str(path.parent / shard), device="cpu"))
        return sd
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ModelError(f"{path}: unknown weights format; pass a .safetensors, .pt or .bin file or a checkpoint folder")


def _unwrap(sd: Mapping) -> dict:
    """Accept training-style wrappers ({"state_dict": ...}, {"ema": ...}) and DDP's ``module.`` prefix."""
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = [sd[k] for k in ("state_dict", "ema", "model", "module") if isinstance(sd.get(k), Mapping)]
        if not inner:
            break
        sd = inner[0]
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _listed(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_stdit3(path_or_state_dict, config: STDiT3Config | None = None, strict: bool = True, *,
                dtype: torch.dtype | None = torch.float32) -> STDiT3:
    """Load STDiT3 weights into a model in eval mode, on CPU.

    ``path_or_state_dict``: a state dict, a ``.safetensors``/``.pt``/``.bin`` file, or a
    folder as on the hub (``config.json`` + ``model.safetensors``; also
    ``diffusion_pytorch_model.safetensors``, sharded ``*.index.json`` or ``*.bin``).
    ``config``: default the folder's ``config.json``, else read off the weights' shapes.
    ``rope.freqs`` may be missing (recomputed). Any other missing key, and with ``strict``
    any unexpected key, raises :class:`CheckpointMismatchError` (a ``ValueError``) naming
    them; a shape mismatch always does. ``dtype``: cast floating weights (None keeps the
    checkpoint's).
    """
    file_config = None
    if isinstance(path_or_state_dict, Mapping):
        sd = path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        if path.is_dir():
            if (path / "config.json").is_file():
                file_config = json.loads((path / "config.json").read_text())
            found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
            if not found:
                raise ModelError(f"{path} holds none of {', '.join(WEIGHT_FILES)}: pass the STDiT3 checkpoint folder")
            path = found[0]
        elif not path.is_file():
            raise ModelError(f"STDiT3 checkpoint {path} does not exist")
        sd = _read_weights(path)
    sd = _unwrap(sd)
    if config is None:
        config = STDiT3Config.from_dict(file_config) if file_config is not None else STDiT3Config.from_state_dict(sd)

    with torch.device("meta"):
        model = STDiT3(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(expected) - set(sd) - {"rope.freqs"}
    unexpected = set(sd) - set(expected)
    wrong = [f"{k} {tuple(sd[k].shape)} (model {expected[k]})" for k in sorted(set(sd) & set(expected))
             if tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {_listed(wrong)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match STDiT3(depth={config.depth}, hidden_size={config.hidden_size}, "
            f"num_heads={config.num_heads}): {'; '.join(problems)}. Pass the config that matches the "
            f"checkpoint (config= or its config.json) or the right checkpoint"
        )

    sd = {k: v for k, v in sd.items() if k in expected}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if "rope.freqs" not in sd:
        freqs = default_rope_freqs(config.head_dim)
        model.rope.freqs = nn.Parameter(freqs if dtype is None else freqs.to(dtype), requires_grad=False)
    assert not any(t.is_meta for t in model.state_dict().values()), "a tensor was left on the meta device"
    return model.eval()
