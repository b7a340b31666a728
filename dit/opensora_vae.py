"""Open-Sora 1.2 video VAE (``OpenSoraVAE_V1_2``), with the released checkpoint's parameter names.

Facts from the release's ``opensora/models/vae/{vae.py,vae_temporal.py,utils.py}`` (v1.2.0); a local copy of hpcai-tech
"OpenSora-VAE-v1.2" loads with strict key matching (:func:`load_opensora_vae`).

Two stages, applied in this order by :meth:`OpenSoraVAE.encode` (reverse in ``decode``):

1. spatial: an SDXL-architecture diffusers ``AutoencoderKL`` run on every frame alone,
   ``(B, 3, T, H, W) -> (B, 4, T, H/8, W/8)``, in micro-batches of 4 frames, scaled by a
   hard-coded 0.18215 (not the SDXL config's 0.13025: the release ignores that field);
2. temporal: a causal 3D-conv VAE (MAGVIT-v2 style) that compresses time 4x,
   ``(B, 4, T, h, w) -> (B, 4, ceil(T/4), h, w)``, run on micro-chunks of 17 frames
   (5 latent frames) that never see each other;

then ``z = (z_raw - shift) / scale`` per channel.

"Causal" is about the convolutions only (all time padding goes in front). The GroupNorms
pool statistics over every frame of a chunk, as in the release, so inside one 17-frame
chunk a later frame does move earlier latents slightly; across chunks nothing leaks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from dit.stdit3 import WEIGHT_FILES, CheckpointMismatchError, _listed, _read_weights, _unwrap
from dit.errors import ModelError

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # the release's DiagonalGaussianDistribution clamp


@dataclass(frozen=True)
class OpenSoraVAEConfig:
    """OpenSoraVAE_V1_2 hyper-parameters; the defaults are the release's.

    ``spatial_*`` shape the diffusers ``AutoencoderKL`` (SDXL VAE: 83.65M parameters),
    ``temporal_*`` the causal VAE (``VAE_Temporal_SD``). Shrink both for tests.
    """

    latent_channels: int = 4  # spatial latent = temporal in/out = temporal latent channels
    # spatial (diffusers AutoencoderKL, SDXL architecture)
    spatial_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    spatial_layers_per_block: int = 2
    spatial_norm_num_groups: int = 32
    spatial_scaling: float = 0.18215
    micro_batch_size: int = 4  # frames per spatial encode/decode call
    # temporal (VAE_Temporal_SD)
    temporal_filters: int = 128
    temporal_num_res_blocks: int = 4
    temporal_channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # one per stage transition
    temporal_num_groups: int = 32
    micro_frame_size: int = 17  # pixel frames per temporal chunk
    # latent normalisation z = (z_raw - shift) / scale
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    def __post_init__(self):
        for name in ("spatial_block_out_channels", "temporal_channel_multipliers", "shift", "scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "temporal_downsample", tuple(bool(d) for d in self.temporal_downsample))
        problems = []
        for name in ("latent_channels", "spatial_layers_per_block", "spatial_norm_num_groups", "micro_batch_size",
                     "temporal_filters", "temporal_num_res_blocks", "temporal_num_groups", "micro_frame_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.spatial_block_out_channels or any(
                c < 1 or c % self.spatial_norm_num_groups for c in self.spatial_block_out_channels):
            problems.append(f"spatial_block_out_channels {self.spatial_block_out_channels} must be non-empty "
                            f"multiples of spatial_norm_num_groups {self.spatial_norm_num_groups}")
        mults = self.temporal_channel_multipliers
        if not mults or min(mults) < 1:
            problems.append(f"temporal_channel_multipliers must be positive ints, got {mults!r}")
        elif any((self.temporal_filters * m) % self.temporal_num_groups for m in mults):
            problems.append(f"temporal_filters * every multiplier must be a multiple of temporal_num_groups "
                            f"{self.temporal_num_groups} (GroupNorm), got filters {self.temporal_filters}, "
                            f"multipliers {mults}")
        if mults and len(self.temporal_downsample) != len(mults) - 1:
            problems.append(f"temporal_downsample needs one flag per stage transition "
                            f"({len(mults) - 1}), got {self.temporal_downsample!r}")
        for name in ("shift", "scale"):
            if len(getattr(self, name)) != self.latent_channels:
                problems.append(f"{name} needs latent_channels={self.latent_channels} values, "
                                f"got {getattr(self, name)!r}")
        if any(s == 0 for s in self.scale):
            problems.append(f"scale must be non-zero, got {self.scale!r}")
        if not self.spatial_scaling > 0:
            problems.append(f"spatial_scaling must be positive, got {self.spatial_scaling!r}")
        if problems:
            raise ValueError("invalid OpenSoraVAEConfig: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, d: Mapping) -> "OpenSoraVAEConfig":
        """From a ``config.json``; keys that are not fields are ignored, so the hub's own
        ``config.json`` (``vae_2d``, ``vae_temporal``, ``freeze_vae_2d``, ... next to
        ``micro_frame_size``, ``shift``, ``scale``) gives the released config."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.spatial_block_out_channels) - 1)

    @property
    def micro_latent_frames(self) -> int:
        """Latent frames of one full chunk (17 -> 5)."""
        return self.chunk_latent_frames(self.micro_frame_size)

    def chunk_latent_frames(self, frames: int) -> int:
        """The temporal VAE pads a chunk in front to a multiple of the time factor: ceil(frames / 4)."""
        return -(-frames // self.time_factor)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames for ``num_frames`` pixel frames: full 17-frame chunks give 5 each, a
        remainder of r frames gives ceil(r / 4) (51 -> 15, 17 -> 5, 20 -> 6)."""
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        full, rest = divmod(num_frames, self.micro_frame_size)
        return full * self.micro_latent_frames + (self.chunk_latent_frames(rest) if rest else 0)


# --------------------------------------------------------------------------- temporal VAE


class CausalConv3d(nn.Module):
    """3D conv padded only in front in time (zeros), symmetric in space; the conv is ``.conv``.

    A stride-s conv gets ``k - s`` front frames instead of ``k - 1``, so T frames (T a
    multiple of s) give exactly T / s.
    """

    def __init__(self, chan_in: int, chan_out: int, kernel_size, time_stride: int = 1, bias: bool = True):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        assert kh % 2 and kw % 2, "spatial kernel must be odd to keep H, W"
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - time_stride, 0)  # F.pad order: W, H, T(front, back)
        self.conv = nn.Conv3d(chan_in, chan_out, (kt, kh, kw), stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x):  # (B, C, T, H, W) -> (B, C', T / stride, H, W)
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; a 1x1x1 conv (``conv3``) on the shortcut when channels change."""

    def __init__(self, in_channels: int, filters: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, filters, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, filters)
        self.conv2 = CausalConv3d(filters, filters, 3, bias=False)
        self.conv3 = CausalConv3d(in_channels, filters, 1, bias=False) if in_channels != filters else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def depth_to_space_time(x: torch.Tensor, ts: int) -> torch.Tensor:
    """``B (C ts) T H W -> B C (T ts) H W``: channel ``c * ts + s`` becomes frame ``t * ts + s``."""
    if ts == 1:
        return x
    B, Cts, T, H, W = x.shape
    x = x.view(B, Cts // ts, ts, T, H, W).transpose(2, 3)  # (B, C, T, ts, H, W)
    return x.reshape(B, Cts // ts, T * ts, H, W)


class Encoder(nn.Module):
    """conv_in, stages of ResBlocks with a stride-2-in-time conv after the downsampling ones,
    4 more ResBlocks, GroupNorm-SiLU, 1x1x1 conv to mean and logvar."""

    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        f, g, n = c.temporal_filters, c.temporal_num_groups, c.temporal_num_res_blocks
        self.conv_in = CausalConv3d(c.latent_channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()  # one per transition; Identity keeps the release's indices
        prev = f
        for i, mult in enumerate(c.temporal_channel_multipliers):
            self.block_res_blocks.append(nn.ModuleList(
                ResBlock(prev if j == 0 else f * mult, f * mult, g) for j in range(n)))
            prev = f * mult
            if i < len(c.temporal_downsample):
                self.conv_blocks.append(CausalConv3d(prev, prev, 3, time_stride=2) if c.temporal_downsample[i]
                                        else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, g) for _ in range(n))
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, 2 * c.latent_channels, 1)

    def forward(self, x):  # (B, 4, T, h, w) -> (B, 8, T / 4, h, w)
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`; upsampling is a conv to ``2x`` channels then depth-to-space
    in time. ``block_res_blocks[i]`` / ``conv_blocks[i - 1]`` keep the encoder's stage index
    (built deepest first, as the release does)."""

    def __init__(self, c: OpenSoraVAEConfig):
        super().__init__()
        f, g, n = c.temporal_filters, c.temporal_num_groups, c.temporal_num_res_blocks
        mults = c.temporal_channel_multipliers
        self.time_strides = [2 if d else 1 for d in c.temporal_downsample]
        prev = f * mults[-1]
        self.conv1 = CausalConv3d(c.latent_channels, prev, 3)
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, g) for _ in range(n))
        blocks, convs = {}, {}
        for i in reversed(range(len(mults))):
            blocks[i] = nn.ModuleList(ResBlock(prev if j == 0 else f * mults[i], f * mults[i], g) for j in range(n))
            prev = f * mults[i]
            if i > 0:
                ts = self.time_strides[i - 1]
                convs[i - 1] = CausalConv3d(prev, prev * ts, 3) if ts > 1 else nn.Identity()
        self.block_res_blocks = nn.ModuleList(blocks[i] for i in range(len(mults)))
        self.conv_blocks = nn.ModuleList(convs[i] for i in range(len(mults) - 1))
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, c.latent_channels, 3)

    def forward(self, z):  # (B, 4, T', h, w) -> (B, 4, 4 T', h, w)
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0:
                x = depth_to_space_time(self.conv_blocks[i - 1](x), self.time_strides[i - 1])
        return self.conv_out(F.silu(self.norm1(x)))


class DiagonalGaussian:
    """Posterior of the temporal VAE: channels split into mean and logvar (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # The release draws float32 noise on the CPU and moves it: same seed, same latents.
        noise = torch.randn(self.mean.shape, generator=generator)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean


class TemporalVAE(nn.Module):
    """The release's ``VAE_Temporal``: 4x in time, spatial size unchanged, 4 -> 4 channels."""

    def __init__(self, config: OpenSoraVAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * c, 2 * c, 1)
        self.post_quant_conv = CausalConv3d(c, c, 1)
        self.decoder = Decoder(config)

    def time_padding(self, num_frames: int) -> int:
        return -num_frames % self.config.time_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # (B, 4, T, h, w) -> over (B, 4, ceil(T/4), h, w)
        x_padded = F.pad(x, (0, 0, 0, 0, self.time_padding(x.shape[2]), 0))  # zeros in front: causal
        return DiagonalGaussian(self.quant_conv(self.encoder(x_padded)).to(x.dtype))

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:  # (B, 4, T', h, w) -> (B, 4, num_frames, h, w)
        x = self.decoder(self.post_quant_conv(z))  # (B, 4, 4 T', h, w)
        return x[:, :, self.time_padding(num_frames):]  # drop the frames that encode padded in front


# --------------------------------------------------------------------------- full VAE


class SpatialVAE(nn.Module):
    """Per-frame diffusers ``AutoencoderKL``; the attribute name ``module`` is the release's
    (``VideoAutoencoderKL.module``), so keys read ``spatial_vae.module.*``."""

    def __init__(self, config: OpenSoraVAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL  # heavy import, kept lazy

        n = len(config.spatial_block_out_channels)
        self.config = config
        self.module = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=config.latent_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=config.spatial_block_out_channels, layers_per_block=config.spatial_layers_per_block,
            norm_num_groups=config.spatial_norm_num_groups, act_fn="silu", sample_size=1024,
        )

    def _per_frame(self, x: torch.Tensor, fn) -> torch.Tensor:
        B, _, T = x.shape[:3]
        frames = x.transpose(1, 2).flatten(0, 1)  # (B T, C, H, W), batch-major as the release
        bs = self.config.micro_batch_size
        out = torch.cat([fn(frames[i:i + bs]) for i in range(0, frames.shape[0], bs)])
        return out.unflatten(0, (B, T)).transpose(1, 2)  # (B, C', T, H', W')

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None):
        def enc(frames):
            dist = self.module.encode(frames).latent_dist
            return (dist.sample(generator) if sample else dist.mode()) * self.config.spatial_scaling

        return self._per_frame(x, enc)  # (B, 3, T, H, W) -> (B, 4, T, H/8, W/8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (B, 4, T, h, w) -> (B, 3, T, 8h, 8w)
        return self._per_frame(z, lambda frames: self.module.decode(frames / self.config.spatial_scaling).sample)


class OpenSoraVAE(nn.Module):
    """The release's ``VideoAutoencoderPipeline`` as built by ``OpenSoraVAE_V1_2`` (inference only)."""

    def __init__(self, config: OpenSoraVAEConfig | None = None):
        super().__init__()
        self.config = config = config or OpenSoraVAEConfig()
        self.spatial_vae = SpatialVAE(config)
        self.temporal_vae = TemporalVAE(config)
        # persistent: the checkpoint carries them, shaped to broadcast over (B, C, T, h, w)
        self.register_buffer("scale", torch.tensor(config.scale).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(config.shift).view(1, -1, 1, 1, 1))

    def latent_frames(self, num_frames: int) -> int:
        return self.config.latent_frames(num_frames)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x`` (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, 4, latent_frames(T), H/8, W/8).

        ``sample``: draw from both posteriors as the release does (spatial first, then each
        temporal chunk, from ``generator`` or the global RNG); False takes their means.
        """
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"encode expects (B, 3, T, H, W) RGB video, got shape {tuple(x.shape)}")
        x_z = self.spatial_vae.encode(x, sample, generator)  # (B, 4, T, h, w)
        m = self.config.micro_frame_size
        z = []
        for i in range(0, x_z.shape[2], m):  # chunks never see each other
            posterior = self.temporal_vae.encode(x_z[:, :, i:i + m])
            z.append(posterior.sample(generator) if sample else posterior.mode())
        z = torch.cat(z, dim=2)  # (B, 4, T', h, w)
        return (z - self.shift) / self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents (B, 4, T', h, w) -> video (B, 3, num_frames, 8h, 8w), not clamped.

        ``num_frames`` must be a frame count that encodes to ``T'`` latent frames: each 5-frame
        latent chunk decodes to 20 frames and drops the front frames its encode padded.
        """
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects ({self.config.latent_channels}-channel) latents (B, C, T', h, w), "
                             f"got shape {tuple(z.shape)}")
        if self.latent_frames(num_frames) != z.shape[2]:
            raise ValueError(f"num_frames={num_frames} encodes to {self.latent_frames(num_frames)} latent frames, "
                             f"but z has {z.shape[2]}: pass the pixel frame count the latents were made for")
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        mz, m = self.config.micro_latent_frames, self.config.micro_frame_size
        x_z = []
        for i in range(0, z.shape[2], mz):
            x_z.append(self.temporal_vae.decode(z[:, :, i:i + mz], num_frames=min(m, num_frames)))
            num_frames -= m
        return self.spatial_vae.decode(torch.cat(x_z, dim=2))  # (B, 3, num_frames, H, W)


# --------------------------------------------------------------------------- loading


def _read_config(path: Path) -> OpenSoraVAEConfig:
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return OpenSoraVAEConfig.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path} is not a valid Open-Sora VAE config ({exc}): fix it, or delete it to use the "
                         f"release's config") from exc


def load_opensora_vae(path_or_state_dict, config: OpenSoraVAEConfig | None = None, *,
                      dtype: torch.dtype | None = torch.float32) -> OpenSoraVAE:
    """Load OpenSoraVAE_V1_2 weights into a model in eval mode, on CPU.

    ``path_or_state_dict``: a state dict, a ``.safetensors``/``.pt``/``.bin`` file, or the hub
    folder (``model.safetensors``). A training wrapper (``{"state_dict": ...}``) and a
    ``module.``/``model.`` prefix on every key are stripped. ``config``: default a folder's
    ``config.json`` (:meth:`OpenSoraVAEConfig.from_dict`: the fields it names, the release's
    values for the rest; the hub folder's own file gives the release's config), else the
    release's. Every key must match, both ways, with its shape; otherwise
    :class:`CheckpointMismatchError` (a ``ValueError``) names them. ``dtype``: cast floating
    weights (None keeps the checkpoint's).
    """
    if isinstance(path_or_state_dict, Mapping):
        sd = path_or_state_dict
    else:
        path = Path(path_or_state_dict).expanduser()
        if path.is_dir():
            if config is None and (path / "config.json").is_file():
                config = _read_config(path / "config.json")
            found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
            if not found:
                raise ModelError(f"{path} holds none of {', '.join(WEIGHT_FILES)}: pass the OpenSora-VAE-v1.2 folder")
            path = found[0]
        elif not path.is_file():
            raise ModelError(f"Open-Sora VAE checkpoint {path} does not exist")
        sd = _read_weights(path)
    sd = _unwrap(sd)  # also strips DDP's "module."
    if sd and all(k.startswith("model.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items()}
    config = config or OpenSoraVAEConfig()

    with torch.device("meta"):
        model = OpenSoraVAE(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    wrong = [f"{k} {tuple(sd[k].shape)} (model {expected[k]})" for k in sorted(set(sd) & set(expected))
             if tuple(sd[k].shape) != expected[k]]
    problems = [f"{what}: {_listed(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if keys]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match OpenSoraVAE(spatial {config.spatial_block_out_channels}, temporal filters "
            f"{config.temporal_filters}): {'; '.join(problems)}. Pass the OpenSora-VAE-v1.2 checkpoint "
            f"(keys spatial_vae.module.*, temporal_vae.*, scale, shift) or the config that matches it"
        )
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values()), "a tensor was left on the meta device"
    return model.eval()
