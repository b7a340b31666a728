"""Build the small random-weight Latte checkpoint shipped as ``--preset tiny``.

The components are the real diffusers / transformers classes at a tiny size, saved in
diffusers pipeline layout, so the preset loads through exactly the code path a real
checkpoint (e.g. a local copy of maxin-cn/Latte-1) takes. The weights are random: reuse
dynamics and quality numbers measured on them mean nothing (a trained small model is a
separate piece of work). The tokenizer is byte-level ByT5, which needs no vocabulary file.

    python tools/make_tiny_latte.py --out exporter/presets/latte-tiny
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, LattePipeline, LatteTransformer3DModel
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

TEXT_DIM = 64


def build(seed: int = 0) -> LattePipeline:
    torch.manual_seed(seed)
    # Same block structure as Latte-1 (adaLN-single, learned sigma: out = 2 x in channels),
    # at 4 heads x 16 dims and 4 layers.
    transformer = LatteTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        cross_attention_dim=64,
        attention_bias=True,
        sample_size=16,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        video_length=16,
    )
    # ByT5's vocabulary: 3 special tokens + 256 bytes + 125 extra ids.
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=384,
            d_model=TEXT_DIM,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )
    tokenizer = ByT5Tokenizer()
    # Three resolution levels: 8x8 latent pixels -> 4x spatial compression (Latte-1's VAE is 8x).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )
    # Latte-1's scheduler settings.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    return LattePipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("exporter/presets/latte-tiny"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe = build(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=args.out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
