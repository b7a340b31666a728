"""Small randomly initialised checkpoints, in the released models' folder layouts.

    python tools/make_tiny.py --model cogvideox --variant 2b --out exporter/presets/cogvideox-tiny
    python tools/make_tiny.py --model cogvideox --variant 5b --out exporter/presets/cogvideox-tiny-5b
    python tools/make_tiny.py --model opensora --out /tmp/opensora-tiny

The same architecture classes and configuration keys as the released checkpoints (CogVideoX-2B:
sin-cos positions and CogVideoXDDIM; CogVideoX-5B: rotary positions and CogVideoXDPM; Open-Sora
1.2: STDiT3 with the released key names, the Open-Sora VAE and RFlowSampler in the folder layout
of exporter/models/opensora_pipeline.py), at a size that exports and runs in seconds on a CPU.
The weights are random (seeded, so the same command writes the same files): these check
loading, export, the runtime and its oracle against the reference pipeline, not video quality —
tools/train.py makes trained models.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python tools/make_tiny.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tools import synthetic  # noqa: E402

TEXT_DIM = 32
TEXT_TOKENS = 16  # CogVideoXPipeline pads every prompt to the transformer's max_text_seq_length

# CogVideoX's released scheduler settings (v-prediction, zero-SNR rescaled scaled-linear betas, trailing spacing).
COGVIDEOX_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                           timestep_spacing="trailing", rescale_betas_zero_snr=True)


def text_components(seed: int, extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer over the synthetic domain's vocabulary (plus ``extra_words``) and a
    2-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

    from tools.train import word_tokenizer

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(synthetic.vocabulary() + list(extra_words))
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False))
    return tokenizer, text_encoder.eval()


def cogvideox_components(variant: str = "2b", seed: int = 0, layers: int = 4) -> dict:
    """tokenizer, text_encoder, vae, transformer, scheduler of a tiny CogVideoX-``variant``."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXDPMScheduler,
                           CogVideoXTransformer3DModel)

    if variant not in ("2b", "5b"):
        raise ValueError(f"variant {variant!r}: pass 2b (sin-cos positions) or 5b (rotary positions)")
    tokenizer, text_encoder = text_components(seed)
    torch.manual_seed(seed + 1)
    # 4 blocks: 8x spatial, 4x temporal compression, as the released VAE.
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1,
                                 norm_num_groups=4, temporal_compression_ratio=4, sample_height=64, sample_width=64,
                                 scaling_factor=1.15258426 if variant == "2b" else 0.7).eval()
    torch.manual_seed(seed + 2)
    rotary = variant == "5b"
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=TEXT_DIM, num_layers=layers, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=rotary,
        spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0).eval()
    scheduler_cls = CogVideoXDPMScheduler if rotary else CogVideoXDDIMScheduler
    scheduler = scheduler_cls(**COGVIDEOX_SCHEDULER, snr_shift_scale=1.0 if rotary else 3.0)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


# Open-Sora 1.2 at toy size: 8x spatial / 4x temporal VAE with 17-frame micro chunks like the
# release; captions of the synthetic domain plus the aesthetic-score suffix fit in 24 tokens.
OPENSORA_TOKENS = 24
OPENSORA_SHAPE = {"num_frames": 17, "height": 64, "width": 64}  # the tiny default: 5 x 8 x 8 latents
SCORE_WORDS = ("aesthetic", "score", ":", ".", *"0123456789")  # " aesthetic score: 6.5." as known words


def opensora_components(seed: int = 0, layers: int = 4) -> dict:
    """transformer, vae, text_encoder, tokenizer, scheduler of a tiny Open-Sora 1.2."""
    from exporter.models.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
    from exporter.models.rflow import RFlowSampler
    from exporter.models.stdit3 import STDiT3, STDiT3Config

    tokenizer, text_encoder = text_components(seed, SCORE_WORDS)
    torch.manual_seed(seed + 1)
    vae = OpenSoraVAE(OpenSoraVAEConfig(
        spatial_block_out_channels=(8, 8, 8, 8), spatial_layers_per_block=1, spatial_norm_num_groups=4,
        temporal_filters=4, temporal_num_res_blocks=1, temporal_num_groups=4)).eval()
    torch.manual_seed(seed + 2)
    transformer = STDiT3(STDiT3Config(
        depth=layers, hidden_size=64, num_heads=4, patch_size=(1, 2, 2), caption_channels=TEXT_DIM,
        model_max_length=OPENSORA_TOKENS, input_sq_size=512)).eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": RFlowSampler()}


def save_pipeline(pipe, out: Path) -> Path:
    """``pipe.save_pretrained`` into a temporary sibling, renamed into place."""
    from exporter.export import replace_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_cogvideox(out: Path, variant: str = "2b", seed: int = 0) -> Path:
    from diffusers import CogVideoXPipeline

    return save_pipeline(CogVideoXPipeline(**cogvideox_components(variant, seed)), out)


def make_opensora(out: Path, seed: int = 0) -> Path:
    from exporter.models.opensora_pipeline import OpenSoraPipeline

    return save_pipeline(OpenSoraPipeline(**opensora_components(seed), defaults=OPENSORA_SHAPE), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["cogvideox", "opensora"], required=True)
    ap.add_argument("--variant", choices=["2b", "5b"], default="2b", help="cogvideox: 2b (sin-cos) or 5b (rotary)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.model == "opensora":
        out = make_opensora(args.out, args.seed)
    else:
        out = make_cogvideox(args.out, args.variant, args.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
