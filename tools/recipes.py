"""Training recipes for the CogVideoX and Open-Sora architectures on the synthetic domain
(``python -m tools.train --model cogvideox|opensora``; Latte's recipe lives in train.py itself).

Each recipe trains, deterministically for ``--seed``:
1. the model's own VAE class on the synthetic clips —
   CogVideoX: ``AutoencoderKLCogVideoX`` (3D causal, 4x spatial, 4x temporal: 9 frames -> 3);
   Open-Sora: our ``OpenSoraVAE`` — its spatial ``AutoencoderKL`` per frame (4x), then the
   temporal causal VAE on those latents (4x in time, one 17-frame chunk -> 5), then the latent
   shift/scale set to the latents' per-channel mean/std, as the release normalises;
2. the transformer (``CogVideoXTransformer3DModel`` 2B-style with sin-cos positions; our
   ``STDiT3``) and a small T5 over the domain's word tokenizer, with the objective its sampler
   expects — CogVideoX: v-prediction on CogVideoXDDIM's zero-terminal-SNR schedule, prompts
   padded to ``max_text_seq_length`` and encoded without a mask (as CogVideoXPipeline encodes
   them); Open-Sora: rectified flow (``x_t = (1 - t) x0 + t eps``, target ``x0 - eps``), the
   caption masked and suffixed with the aesthetic score, dropped prompts replaced by the
   model's learned null caption ``y_embedding`` (the release's CFG training).

Saved in the layouts ``foresight-export --model-path`` loads (diffusers CogVideoXPipeline; the
Open-Sora folder of ``dit.opensora_pipeline``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tools import synthetic
from tools.training import (COGVIDEOX_SCHEDULER, SCORE_WORDS, TEXT_DIM, curriculum_indices, draw_clips, kl_vae_loss,
                            lr_at, sample_timesteps, skew_at, skew_noise, t5_encoder, to_unit, vae_norm_groups,
                            word_tokenizer)

COG_TEXT_TOKENS = 16  # a domain prompt is 9 words + </s>
OS_TEXT_TOKENS = 24  # + " aesthetic score: 6.5." (7 tokens)


def text_encoder_for(tokenizer, seed: int):
    torch.manual_seed(seed)
    return t5_encoder(tokenizer)


def videos(clips: np.ndarray, idx) -> torch.Tensor:
    """uint8 (N, F, H, W, 3)[idx] -> (n, 3, F, H, W) in [-1, 1]."""
    return to_unit(clips[idx]).permute(0, 2, 1, 3, 4)


def train_jointly(transformer, text_encoder, args, loss_fn, log: list) -> float:
    """The transformer and the text encoder, trained together on ``loss_fn``; left in eval mode."""
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    final = _optimise(params, args.steps, args.lr, "transformer", loss_fn, log, "loss")
    transformer.eval()
    text_encoder.eval()
    return final


def train_video_vae(vae, clips: np.ndarray, args, log: list) -> None:
    """``vae`` (a diffusers KL video autoencoder) trained on random batches of ``clips`` (seed
    ``args.seed + 1``); left in eval mode."""
    gen = torch.Generator().manual_seed(args.seed + 1)

    def vae_loss(step):
        x = videos(clips, torch.randint(0, len(clips), (args.vae_batch,), generator=gen).numpy())
        return kl_vae_loss(vae, x, gen, args.kl_weight, args.vae_foreground_weight)

    vae.train()
    _optimise(list(vae.parameters()), args.vae_steps, args.vae_lr, "vae", vae_loss, log, "recon")
    vae.eval()


@torch.no_grad()
def encode_videos(vae, clips: np.ndarray, batch: int = 32) -> torch.Tensor:
    """The posterior modes of ``clips`` (N, C, F', h, w), encoded ``batch`` clips at a time."""
    return torch.cat([vae.encode(videos(clips, np.arange(i, min(i + batch, len(clips))))).latent_dist.mode()
                      for i in range(0, len(clips), batch)])


def _optimise(params, steps: int, lr: float, desc: str, loss_fn, log: list, postfix: str):
    import time

    t0 = time.perf_counter()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, unit="step")
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        loss, parts = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        log.append({"stage": desc, "step": step, **{k: round(v, 6) for k, v in parts.items()},
                    "smoothed": round(running, 6)})
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix_str(f"{postfix} {running:.5f}")
    bar.close()
    print(f"{desc}: {steps} steps in {time.perf_counter() - t0:.1f} s, smoothed {postfix} {running:.5f}")
    return running


# ---------------------------------------------------------------------------- CogVideoX
def cogvideox(args, clips: np.ndarray, prompts: list[str], log: list):
    """Returns the CogVideoXPipeline (tokenizer, text_encoder, vae, transformer, scheduler)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(args.seed)
    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1,
        norm_num_groups=vae_norm_groups(args),
        temporal_compression_ratio=4, sample_height=args.size, sample_width=args.size)
    train_video_vae(vae, clips, args, log)
    scaling = 1.0 / encode_videos(vae, clips[:256], batch=16).std().item()
    vae.register_to_config(scaling_factor=scaling)
    latents = encode_videos(vae, clips) * scaling  # (N, C, F', h, w)
    latents = latents.permute(0, 2, 1, 3, 4).contiguous()  # (N, F', C, h, w): CogVideoX's layout
    print(f"vae done: scaling_factor {scaling:.4f}, latents {tuple(latents.shape)}")

    tokenizer = word_tokenizer(synthetic.vocabulary())
    text_encoder = text_encoder_for(tokenizer, args.seed + 2)
    torch.manual_seed(args.seed + 3)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=args.hidden // args.head_dim, attention_head_dim=args.head_dim, in_channels=4,
        out_channels=4, time_embed_dim=args.hidden, text_embed_dim=TEXT_DIM, num_layers=args.layers,
        sample_width=latents.shape[-1], sample_height=latents.shape[-2], sample_frames=args.frames, patch_size=1,
        max_text_seq_length=COG_TEXT_TOKENS, temporal_compression_ratio=4, use_rotary_positional_embeddings=False)
    scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER, snr_shift_scale=3.0)
    alphas = scheduler.alphas_cumprod.float()  # zero-terminal-SNR, SNR-shifted: what sampling assumes
    ids = tokenizer(prompts + [""], padding="max_length", max_length=COG_TEXT_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty = len(prompts)
    gen = torch.Generator().manual_seed(args.seed + 4)
    subset = curriculum_indices(prompts) if args.curriculum else None

    def loss(step):
        idx = draw_clips(step, args, subset, len(latents), gen)
        text_idx = torch.where(torch.rand(args.batch, generator=gen) < args.cond_dropout, empty, idx)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(args.batch, skew_at(step, args), gen)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v
        emb = text_encoder(ids[text_idx])[0]  # no mask: CogVideoXPipeline encodes padded prompts without one
        pred = transformer(hidden_states=xt, encoder_hidden_states=emb, timestep=t).sample
        value = F.mse_loss(pred, target)
        return value, {"loss": value.item()}

    final = train_jointly(transformer, text_encoder, args, loss, log)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    return pipe, final


# ---------------------------------------------------------------------------- Open-Sora
def opensora(args, clips: np.ndarray, prompts: list[str], log: list):
    """Returns the OpenSoraPipeline (our STDiT3, our OpenSoraVAE, T5, rectified flow)."""
    import dataclasses

    from dit.opensora_pipeline import OpenSoraPipeline, append_score
    from dit.opensora_vae import OpenSoraVAE, OpenSoraVAEConfig
    from dit.rflow import RFlowSampler
    from dit.stdit3 import STDiT3, STDiT3Config

    torch.manual_seed(args.seed)
    config = OpenSoraVAEConfig(spatial_block_out_channels=(32, 64, 64), spatial_layers_per_block=1,
                               spatial_norm_num_groups=vae_norm_groups(args), temporal_filters=32,
                               temporal_num_res_blocks=1,
                               temporal_channel_multipliers=(1, 2, 2), temporal_downsample=(True, True),
                               temporal_num_groups=8, micro_frame_size=args.frames)
    vae = OpenSoraVAE(config)
    spatial = vae.spatial_vae.module  # diffusers AutoencoderKL
    frames = clips.reshape(-1, *clips.shape[2:])  # (N*F, H, W, 3)
    gen = torch.Generator().manual_seed(args.seed + 1)

    def spatial_loss(step):
        x = to_unit(frames[torch.randint(0, len(frames), (args.vae_batch,), generator=gen).numpy()])
        return kl_vae_loss(spatial, x, gen, args.kl_weight, args.vae_foreground_weight)

    spatial.train()
    _optimise(list(spatial.parameters()), args.vae_steps, args.vae_lr, "vae", spatial_loss, log, "recon")
    spatial.eval()
    with torch.no_grad():
        std = spatial.encode(to_unit(frames[:: max(1, len(frames) // 512)][:512])).latent_dist.mode().std().item()
        config = dataclasses.replace(config, spatial_scaling=1.0 / std)
        vae.spatial_vae.config = vae.config = vae.temporal_vae.config = config
        x_z = torch.cat([vae.spatial_vae.encode(videos(clips, np.arange(i, min(i + 32, len(clips)))), sample=False)
                         for i in range(0, len(clips), 32)])  # (N, 4, F, h, w), scaled
    temporal = vae.temporal_vae
    gen = torch.Generator().manual_seed(args.seed + 2)

    def temporal_loss(step):
        x = x_z[torch.randint(0, len(x_z), (args.vae_batch,), generator=gen)]
        posterior = temporal.encode(x)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = F.mse_loss(temporal.decode(z, x.shape[2]), x)
        var = posterior.std ** 2
        kl = (0.5 * (posterior.mean ** 2 + var - 1 - var.log())).mean()
        return recon + args.kl_weight * kl, {"recon": recon.item(), "kl": kl.item()}

    temporal.train()
    _optimise(list(temporal.parameters()), args.vae_steps, args.vae_lr, "temporal vae", temporal_loss, log, "recon")
    temporal.eval()
    with torch.no_grad():
        raw = torch.cat([temporal.encode(x_z[i:i + 64]).mode() for i in range(0, len(x_z), 64)])  # (N, 4, F', h, w)
        shift = raw.mean(dim=(0, 2, 3, 4))
        scale = raw.std(dim=(0, 2, 3, 4))
        config = dataclasses.replace(config, shift=tuple(shift.tolist()), scale=tuple(scale.tolist()))
        vae.spatial_vae.config = vae.config = vae.temporal_vae.config = config
        vae.shift.copy_(shift.view(1, -1, 1, 1, 1))
        vae.scale.copy_(scale.view(1, -1, 1, 1, 1))
        latents = (raw - vae.shift) / vae.scale
    print(f"vae done: spatial scaling {1 / std:.4f}, latents {tuple(latents.shape)}")

    tokenizer = word_tokenizer([*synthetic.vocabulary(), *SCORE_WORDS])
    text_encoder = text_encoder_for(tokenizer, args.seed + 3)
    torch.manual_seed(args.seed + 4)
    transformer = STDiT3(STDiT3Config(depth=args.layers, hidden_size=args.hidden,
                                      num_heads=args.hidden // args.head_dim, patch_size=(1, 1, 1),
                                      caption_channels=TEXT_DIM, model_max_length=OS_TEXT_TOKENS,
                                      input_sq_size=args.size)).initialize_weights()
    tok = tokenizer([append_score(p, 6.5) for p in prompts], padding="max_length", max_length=OS_TEXT_TOKENS,
                    truncation=True, return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask
    size = torch.full((args.batch,), float(args.size))
    fps = torch.full((args.batch,), 24.0)
    gen = torch.Generator().manual_seed(args.seed + 5)
    subset = curriculum_indices(prompts) if args.curriculum else None

    def loss(step):
        idx = draw_clips(step, args, subset, len(latents), gen)
        drop = torch.rand(args.batch, generator=gen) < args.cond_dropout
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = skew_noise(torch.rand(args.batch, generator=gen), skew_at(step, args)) * 1000  # rectified-flow time
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        y = text_encoder(ids[idx], attention_mask=mask[idx])[0]  # (B, L, C)
        null = transformer.y_embedder.y_embedding[None].expand_as(y)
        y = torch.where(drop.view(-1, 1, 1), null, y)  # the release's caption dropout: the learned null caption
        pred = transformer(xt, t, y[:, None], mask[idx], fps=fps, height=size, width=size)[:, :4]
        value = F.mse_loss(pred, x0 - noise)
        return value, {"loss": value.item()}

    final = train_jointly(transformer, text_encoder, args, loss, log)
    # At 32 px the release's resolution-based timestep shift (tuned for 512^2 and up) would put nearly
    # every step at low noise: this model is trained and sampled on the plain uniform schedule.
    sampler = RFlowSampler(num_steps=30, guidance_scale=7.0, use_timestep_transform=False)
    pipe = OpenSoraPipeline(transformer, vae, text_encoder, tokenizer, sampler,
                            defaults={"num_frames": args.frames, "height": args.size, "width": args.size})
    return pipe, final


WAN_TEXT_TOKENS = 16  # WanPipeline's max_sequence_length for the tiny model: 9 words + </s> fit


def wan(args, clips: np.ndarray, prompts: list[str], log: list):
    """Returns the WanPipeline (UMT5, AutoencoderKLWan, WanTransformer3DModel, FlowMatchEuler).

    The VAE is Wan's causal 3D one at 4x in space and time (9 frames of 32x32 -> 3 latent frames of
    8x8); its latents are normalised per channel with the ``latents_mean`` / ``latents_std`` it stores,
    as WanPipeline de-normalises them. The transformer (patch 1x1x1) learns flow matching as
    FlowMatchEulerDiscreteScheduler samples it: ``x_t = (1 - s) x0 + s eps`` at timestep ``1000 s``,
    target ``eps - x0``. Prompts are encoded as WanPipeline encodes them (padded to
    ``WAN_TEXT_TOKENS`` with their mask, the padding's embeddings zeroed); dropped prompts are "" (its
    default negative prompt)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if args.init is not None:
        # Continue a checkpoint: its VAE and latent normalisation stay as they are (so its latents keep
        # their meaning); its transformer and text encoder train on for --steps more.
        init = WanPipeline.from_pretrained(args.init, torch_dtype=torch.float32)
        config = init.transformer.config
        args.layers, args.head_dim = config.num_layers, config.attention_head_dim
        args.hidden = config.num_attention_heads * config.attention_head_dim  # training.json records these
        vae = init.vae
        raw = encode_videos(vae, clips)
    else:
        init = None
        torch.manual_seed(args.seed)
        vae = AutoencoderKLWan(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                               temperal_downsample=[True, True], scale_factor_spatial=4, scale_factor_temporal=4,
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
        train_video_vae(vae, clips, args, log)
        raw = encode_videos(vae, clips)  # (N, C, F', h, w)
        mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=[round(v, 6) for v in mean.tolist()],
                               latents_std=[round(v, 6) for v in std.tolist()])
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents = (raw - mean) / std
    print(f"vae done: latents {tuple(latents.shape)}, mean {vae.config.latents_mean}, std {vae.config.latents_std}")

    if init is not None:
        tokenizer, text_encoder, transformer = init.tokenizer, init.text_encoder, init.transformer
    else:
        tokenizer = word_tokenizer(synthetic.vocabulary())
        torch.manual_seed(args.seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False))
        torch.manual_seed(args.seed + 3)
        transformer = WanTransformer3DModel(
            patch_size=(1, 1, 1), num_attention_heads=args.hidden // args.head_dim, attention_head_dim=args.head_dim,
            in_channels=4, out_channels=4, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=4 * args.hidden,
            num_layers=args.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=64)
    tokenizer.model_max_length = WAN_TEXT_TOKENS
    # At 32 px a high-noise shift (Wan's 3-5 for 480p-720p) would spend most steps where the tiny model has
    # nothing left to decide: trained on uniform noise levels and sampled without a shift.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    tok = tokenizer(prompts + [""], padding="max_length", max_length=WAN_TEXT_TOKENS, truncation=True,
                    return_attention_mask=True, return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask
    empty = len(prompts)
    gen = torch.Generator().manual_seed(args.seed + 4)
    subset = curriculum_indices(prompts) if args.curriculum else None

    def loss(step):
        idx = draw_clips(step, args, subset, len(latents), gen)
        text_idx = torch.where(torch.rand(args.batch, generator=gen) < args.cond_dropout, empty, idx)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        s = skew_noise(torch.rand(args.batch, generator=gen), skew_at(step, args))
        xt = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        m = mask[text_idx]
        emb = text_encoder(ids[text_idx], m).last_hidden_state * m.unsqueeze(-1)  # WanPipeline zeroes the padding
        pred = transformer(hidden_states=xt, timestep=s * 1000, encoder_hidden_states=emb).sample
        value = F.mse_loss(pred, noise - x0)
        return value, {"loss": value.item()}

    final = train_jointly(transformer, text_encoder, args, loss, log)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=scheduler)
    return pipe, final
