"""Small randomly initialised checkpoints, in the released models' folder layouts.

    python -m tools.make_tiny --model cogvideox --variant 2b --out exporter/presets/cogvideox-tiny
    python -m tools.make_tiny --model cogvideox --variant 5b --out exporter/presets/cogvideox-tiny-5b
    python -m tools.make_tiny --model opensora --out /tmp/opensora-tiny
    python -m tools.make_tiny --model wan --out exporter/presets/wan-tiny-random
    python -m tools.make_tiny --model wan-a14b --out exporter/presets/wan-tiny-random-a14b
    python -m tools.make_tiny --model wan-ti2v --out exporter/presets/wan-tiny-random-ti2v

The same architecture classes and configuration keys as the released checkpoints (CogVideoX-2B:
sin-cos positions and CogVideoXDDIM; CogVideoX-5B: rotary positions and CogVideoXDPM; Open-Sora
1.2: STDiT3 with the released key names, the Open-Sora VAE and RFlowSampler in the folder layout
of dit/opensora_pipeline.py), at a size that exports and runs in seconds on a CPU.
The weights are random (seeded, so the same command writes the same files): these check
loading, export, the runtime and its oracle against the reference pipeline, not video quality —
``python -m tools.train`` makes trained models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tools import synthetic
from tools.training import COGVIDEOX_SCHEDULER, SCORE_WORDS, save_pipeline, word_tokenizer

TEXT_DIM = 32
TEXT_TOKENS = 16  # CogVideoXPipeline pads every prompt to the transformer's max_text_seq_length


def text_components(seed: int, extra_words: tuple[str, ...] = ()):
    """A word-level tokenizer over the synthetic domain's vocabulary (plus ``extra_words``) and a
    2-layer T5 encoder."""
    from transformers import T5Config, T5EncoderModel

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


def opensora_components(seed: int = 0, layers: int = 4) -> dict:
    """transformer, vae, text_encoder, tokenizer, scheduler of a tiny Open-Sora 1.2."""
    from dit.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
    from dit.rflow import RFlowSampler
    from dit.stdit3 import STDiT3, STDiT3Config

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


# Wan 2.1 at toy size: UMT5 text encoder, AutoencoderKLWan (8x spatial, 4x temporal), FlowMatchEuler
# with flow_shift, WanPipeline's two CFG passes; prompts padded to WAN_TOKENS (max_sequence_length).
WAN_TOKENS = 16
WAN_SHAPE = {"num_frames": 9, "height": 64, "width": 64}  # the tiny default: 3 x 8 x 8 latents


def wan_components(seed: int = 0, layers: int = 4) -> dict:
    """tokenizer, text_encoder, vae, transformer, scheduler of a tiny Wan 2.1 text-to-video model."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = word_tokenizer(synthetic.vocabulary())
    tokenizer.model_max_length = WAN_TOKENS
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False)).eval()
    torch.manual_seed(seed + 1)
    z = 4
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3][:z],
                           latents_std=[1.5, 0.8, 1.2, 2.0][:z]).eval()
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z, out_channels=z,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=48, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def wan_ti2v_components(seed: int = 0, layers: int = 4) -> dict:
    """Wan 2.2 TI2V-5B's layout: the Wan 2.2 VAE (residual, 2x2 pixel patchify in front: 16x spatial,
    4x temporal) and per-token timesteps (the pipeline's ``expand_timesteps``)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    components = wan_components(seed, layers)
    torch.manual_seed(seed + 1)
    z = 4
    components["vae"] = AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0]).eval()
    components["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=5.0, num_train_timesteps=1000)
    components["expand_timesteps"] = True
    return components


def make_wan(out: Path, seed: int = 0, experts: bool = False, ti2v: bool = False) -> Path:
    """Wan 2.1 T2V, or with ``experts`` Wan 2.2 T2V-A14B's layout: a second transformer (the low-noise
    expert, other random weights), ``boundary_ratio`` 0.875, guidance 4.0 / 3.0 and UniPC with flow
    shift 12 as the A14B release sets them."""
    import json

    from diffusers import UniPCMultistepScheduler, WanPipeline

    # The two-expert layout with 2 layers per expert: its tests export both experts, twice the parts.
    components = wan_ti2v_components(seed) if ti2v else wan_components(seed, layers=2 if experts else 4)
    defaults = {**WAN_SHAPE, "max_sequence_length": WAN_TOKENS, "guidance_scale": 5.0, "num_inference_steps": 50}
    if ti2v:
        defaults.update(height=128, width=128)  # 16x VAE, patch 2: 3 x 4 x 4 tokens
    if experts:
        from diffusers import WanTransformer3DModel

        torch.manual_seed(seed + 3)
        components["transformer_2"] = WanTransformer3DModel.from_config(components["transformer"].config).eval()
        components["boundary_ratio"] = 0.875
        components["scheduler"] = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                          flow_shift=12.0, num_train_timesteps=1000)
        defaults.update(guidance_scale=4.0, guidance_scale_2=3.0, num_inference_steps=40)
    return save_pipeline(WanPipeline(**components), out, extra=lambda folder: (
        Path(folder) / "defaults.json").write_text(json.dumps(defaults, indent=1) + "\n"))


def make_cogvideox(out: Path, variant: str = "2b", seed: int = 0) -> Path:
    from diffusers import CogVideoXPipeline

    return save_pipeline(CogVideoXPipeline(**cogvideox_components(variant, seed)), out)


def make_opensora(out: Path, seed: int = 0) -> Path:
    from dit.opensora_pipeline import OpenSoraPipeline

    return save_pipeline(OpenSoraPipeline(**opensora_components(seed), defaults=OPENSORA_SHAPE), out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["cogvideox", "opensora", "wan", "wan-a14b", "wan-ti2v"], required=True)
    ap.add_argument("--variant", choices=["2b", "5b"], default="2b", help="cogvideox: 2b (sin-cos) or 5b (rotary)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.model == "opensora":
        out = make_opensora(args.out, args.seed)
    elif args.model.startswith("wan"):
        out = make_wan(args.out, args.seed, experts=args.model == "wan-a14b", ti2v=args.model == "wan-ti2v")
    else:
        out = make_cogvideox(args.out, args.variant, args.seed)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
