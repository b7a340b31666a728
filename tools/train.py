"""Train the small text-to-video models shipped with the package, on the synthetic domain.

    python -m tools.train --out exporter/presets/latte-tiny --steps 6000 --layout cross --curriculum 1200 \
        --vae-norm-groups 1    # the shipped preset, ~30 min on 2 CPU cores

Two stages, both deterministic for ``--seed``:
1. A small ``AutoencoderKL`` (4x spatial compression) learns to reconstruct single frames of
   the synthetic moving-shapes clips (``tools/synthetic.py``); its ``scaling_factor`` is set
   to 1/std of the latents, as diffusers' VAEs are. ``colour_separation`` then reports how far
   apart it puts the object colours on each background (``--vae-norm-groups``).
2. The transformer (diffusers' ``LatteTransformer3DModel``, the architecture class the
   exporter supports) and a small T5 text encoder (a word-level tokenizer of the synthetic
   domain's vocabulary built here, or ByT5's bytes with ``--tokenizer byte``: no downloaded
   vocabulary either way) learn to denoise those latents with the DDPM noise schedule the shipped
   DDIM scheduler uses (v-prediction by default), with 10% of the prompts dropped to "" for
   classifier-free guidance.

The result is saved in diffusers ``LattePipeline`` layout (what ``from_pretrained`` and
``foresight-export --model-path`` load), plus ``training.json`` (arguments, loss curve,
seconds) and ``defaults.json`` (the model's Foresight defaults, picked with
``tools/sweep.py``, and its guidance scale, passed here with ``--foresight`` / ``--guidance``). ``--model
cogvideox`` / ``--model opensora`` / ``--model wan`` train those architectures on the same domain with the recipes in
``tools/recipes.py`` (their own VAE classes and sampler objectives), saved in the layouts
``foresight-export`` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools import synthetic
from tools.common import command_line
from tools.training import (CURRICULUM_SUBSET, TEXT_DIM, TEXT_TOKENS, curriculum_indices, draw_clips, kl_vae_loss,
                            lr_at, sample_timesteps, save_pipeline, skew_at, t5_encoder, to_unit, vae_norm_groups,
                            word_tokenizer)

ROOT = Path(__file__).resolve().parent.parent


def build_components(args):
    from diffusers import AutoencoderKL, DDIMScheduler, LatteTransformer3DModel
    from transformers import ByT5Tokenizer

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=vae_norm_groups(args),
        sample_size=args.size,
    )
    latent = args.size // 4
    transformer = LatteTransformer3DModel(
        num_attention_heads=args.hidden // args.head_dim, attention_head_dim=args.head_dim, in_channels=4,
        out_channels=8,
        num_layers=args.layers, cross_attention_dim=args.hidden, attention_bias=True, sample_size=latent,
        patch_size=1, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=TEXT_DIM, video_length=args.frames,
    )
    tokenizer = word_tokenizer(synthetic.vocabulary()) if args.tokenizer == "word" else ByT5Tokenizer()
    text_encoder = t5_encoder(tokenizer)
    # Latte-1's scheduler settings (DDIM over the linear-beta DDPM schedule it was trained with).
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type=args.prediction,
                              timestep_spacing="leading")
    return vae, transformer, text_encoder, tokenizer, scheduler


def train_vae(vae, clips: np.ndarray, args, log) -> float:
    """Reconstruction + a small KL term on single frames; returns the latent scaling factor."""
    frames = clips.reshape(-1, *clips.shape[2:])  # (N*F, H, W, 3)
    gen = torch.Generator().manual_seed(args.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    from tqdm.auto import tqdm

    bar = tqdm(range(args.vae_steps), desc="vae", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        idx = torch.randint(0, frames.shape[0], (args.vae_batch,), generator=gen)
        x = to_unit(frames[idx.numpy()])
        loss, parts = kl_vae_loss(vae, x, gen, args.kl_weight, args.vae_foreground_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        log.append({"stage": "vae", "step": step, "recon": round(parts["recon"], 6), "kl": round(parts["kl"], 4)})
        if step % 25 == 0 or step == args.vae_steps - 1:
            bar.set_postfix(recon=f"{parts['recon']:.5f}", kl=f"{parts['kl']:.3f}")
    vae.eval()
    with torch.no_grad():
        sample = to_unit(frames[:: max(1, frames.shape[0] // 512)][:512])
        std = vae.encode(sample).latent_dist.mode().std().item()
    return 1.0 / std


@torch.no_grad()
def encode_clips(vae, clips: np.ndarray, scaling: float) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 -> scaled latents (N, C, F, h, w), the VAE posterior's mode."""
    out = []
    for i in range(0, clips.shape[0], 64):
        chunk = clips[i:i + 64]
        n, f = chunk.shape[:2]
        z = vae.encode(to_unit(chunk.reshape(-1, *chunk.shape[2:]))).latent_dist.mode() * scaling
        out.append(z.reshape(n, f, *z.shape[1:]).permute(0, 2, 1, 3, 4))  # (n, C, F, h, w)
    return torch.cat(out)


@torch.no_grad()
def colour_separation(vae, scaling: float, frames: int = 8, size: int = 32, seed: int = 1) -> dict[str, dict]:
    """How far apart the VAE puts the object colours, per background: one clip (a fixed spec drawn with
    ``seed``) rendered in every colour on each background, encoded (posterior mode x ``scaling``), and the
    mean and smallest mean squared latent difference over colour pairs. The transformer's loss is this
    latent mse, so a background whose colours sit close together is one where drawing the wrong colour
    costs it little (its colour is then learned last, or not at all)."""
    base = synthetic.sample_spec(random.Random(seed), frames=frames, height=size, width=size, layout="cross")
    out = {}
    for background in synthetic.BACKGROUNDS:
        z = encode_clips(vae, np.stack([synthetic.render(dataclasses.replace(base, color=c, background=background),
                                                         frames, size, size) for c in synthetic.COLORS]), scaling)
        pairs = [F.mse_loss(a, b).item() for i, a in enumerate(z) for b in z[i + 1:]]
        out[background] = {"mean": round(sum(pairs) / len(pairs), 5), "min": round(min(pairs), 5)}
    return out


def train_transformer(transformer, text_encoder, tokenizer, latents, prompts, args, log):
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                prediction_type=args.prediction)
    tok = tokenizer([p.lower().strip() for p in prompts] + [""], padding="max_length", max_length=TEXT_TOKENS,
                    truncation=True, return_tensors="pt")
    ids, mask = tok.input_ids, tok.attention_mask
    empty = len(prompts)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed + 2)
    subset = curriculum_indices(prompts) if args.curriculum else None
    transformer.train()
    text_encoder.train()
    bar = tqdm(range(args.steps), desc="transformer", unit="step")
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        idx = draw_clips(step, args, subset, latents.shape[0], gen)
        text_idx = torch.where(torch.rand(args.batch, generator=gen) < args.cond_dropout, empty, idx)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(args.batch, skew_at(step, args), gen)
        xt = noise_sched.add_noise(x0, noise, t)
        # Inference truncates the embeddings to the prompt's tokens (LattePipeline's mask_feature);
        # here a batch is truncated to its longest prompt.
        keep = int(mask[text_idx].sum(1).max())
        emb = text_encoder(ids[text_idx], attention_mask=mask[text_idx])[0][:, :keep]
        pred = transformer(xt, t, emb).sample[:, : x0.shape[1]]  # the sigma half is unused
        target = noise if args.prediction == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        log.append({"stage": "transformer", "step": step, "loss": round(loss.item(), 6), "smoothed": round(running, 6)})
        if step % 25 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
    transformer.eval()
    text_encoder.eval()


def write_meta(folder: Path, meta: dict) -> None:
    """training.json, and the model's defaults (if given) into defaults.json."""
    (folder / "training.json").write_text(json.dumps(meta, indent=1) + "\n")
    defaults = {k: v for k, v in (("foresight", meta.get("foresight")), ("guidance_scale", meta.get("guidance")))
                if v is not None}
    defaults.update(meta.get("pipeline_defaults") or {})
    if defaults:  # read by foresight-export into the manifest (merged with what the pipeline wrote)
        path = folder / "defaults.json"
        defaults = {**(json.loads(path.read_text()) if path.is_file() else {}), **defaults}
        path.write_text(json.dumps(defaults, indent=1) + "\n")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="latte", choices=["latte", "cogvideox", "opensora", "wan"],
                    help="latte (the default; recipe here) or cogvideox / opensora (tools/recipes.py)")
    ap.add_argument("--out", type=Path, default=None, help="default exporter/presets/<model>-tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clips", type=int, default=6000, help="synthetic clips rendered for training")
    ap.add_argument("--layout", choices=synthetic.LAYOUTS, default="anywhere",
                    help="how clips move (tools/synthetic.py): anywhere = any start, 1.2-2.0 px/frame; cross = the "
                         "object crosses 60-100%% of the frame, so the direction decides where it starts and ends")
    ap.add_argument("--frames", type=int, default=None,
                    help="frames per clip (default: latte 8; cogvideox and wan 9 = 3 latent frames; opensora 17 = one "
                         "VAE chunk)")
    ap.add_argument("--size", type=int, default=32, help="frame height and width in pixels")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=None, metavar="D",
                    help="attention head width; heads = --hidden / D (default: wan 64, others 16). Wan's rotary "
                         "embedding gives each spatial axis 2 * (D // 6) of a head's channels: at 16 that is two "
                         "frequencies (1 and 0.01 rad per token), too few to tell which way an offset points, and "
                         "the tiny Wan ignored the direction word; at 64 it is ten")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-4)
    ap.add_argument("--vae-norm-groups", type=int, default=None, metavar="G",
                    help="GroupNorm groups in the VAE (opensora: its spatial VAE; default: latte 16, cogvideox 8, "
                         "opensora 16). 1 normalises over "
                         "all channels: with several groups each group's contrast is normalised away, and colours on a "
                         "dark background, brighter than it in every channel, end up nearly alike in the latent "
                         "(black: 19x closer than on gray with 16 groups, 2x with 1)")
    ap.add_argument("--vae-foreground-weight", type=float, default=None, metavar="W",
                    help="weight the object's pixels 1 + W times in the VAE's reconstruction loss (default: wan 20, "
                         "others 0). Wan's VAE (RMS norms over channels at every position) otherwise learns the "
                         "background and grey blobs for the small coloured object")
    ap.add_argument("--init", type=Path, default=None, metavar="CHECKPOINT",
                    help="--model wan: continue this checkpoint (a folder --out wrote): its VAE and latent "
                         "normalisation are kept, its transformer and text encoder train --steps more "
                         "(--layers/--hidden/--head-dim/--vae-* are then the checkpoint's)")
    ap.add_argument("--steps", type=int, default=5000, help="transformer training steps")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tokenizer", choices=["word", "byte"], default="word",
                    help="word: a word-level vocabulary of the synthetic domain (one token per attribute); "
                         "byte: ByT5's byte tokenizer (the encoder must learn words from bytes)")
    ap.add_argument("--timestep-skew", type=float, default=1.0,
                    help="training timesteps t = 1000 * (1 - (1 - u)^K), u uniform: 1 = uniform, K > 1 samples "
                         "high-noise steps (where the prompt alone decides the motion) more often")
    ap.add_argument("--curriculum", type=int, default=0, metavar="STEPS",
                    help="the first STEPS transformer steps draw only clips of one colour on one background "
                         f"({CURRICULUM_SUBSET['color']} on {CURRICULUM_SUBSET['background']}), at timesteps skewed "
                         "by --curriculum-skew: with colour and background fixed the direction is most of what the "
                         "prompt changes, and the model learns to follow it (trained on all clips from the start, "
                         "it learned colour and ignored the direction word)")
    ap.add_argument("--curriculum-skew", type=float, default=3.0,
                    help="--timestep-skew of the curriculum steps (default 3: high noise, where only the prompt "
                         "can say which way the object goes)")
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--prediction", choices=["epsilon", "v_prediction"], default="v_prediction",
                    help="what the transformer predicts; v gives the high-noise steps, where the prompt decides "
                         "colour and motion, a useful gradient (epsilon learned the prompt barely: loss with the "
                         "right vs a shuffled prompt differed by 4%%)")
    ap.add_argument("--foresight", type=json.loads, default=None,
                    help='the model\'s Foresight defaults as JSON, e.g. \'{"warmup": 6, "recalculate": 3, "threshold": 1.0}\'')
    ap.add_argument("--guidance", type=float, default=None,
                    help="the model's default classifier-free guidance scale (picked by evaluation)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.vae_norm_groups is not None and args.model == "wan":
        ap.error("--vae-norm-groups: AutoencoderKLWan normalises with RMS norms over channels, not GroupNorm")
    if args.vae_norm_groups is not None and args.vae_norm_groups < 1:
        ap.error(f"--vae-norm-groups must be >= 1 (got {args.vae_norm_groups})")
    if not 0 <= args.curriculum <= args.steps:
        ap.error(f"--curriculum must be between 0 and --steps ({args.steps}) (got {args.curriculum})")
    if args.init is not None:
        if args.model != "wan":
            ap.error("--init: continuing a checkpoint is implemented for --model wan only")
        if not (args.init / "model_index.json").is_file():
            ap.error(f"--init {args.init}: not a checkpoint folder (no model_index.json); pass a folder "
                     "tools.train --out wrote")
    if args.head_dim is None:
        args.head_dim = 64 if args.model == "wan" else 16
    if args.head_dim < 1 or args.hidden % args.head_dim:
        ap.error(f"--head-dim must divide --hidden ({args.hidden}) (got {args.head_dim})")
    args.out = args.out or ROOT / "exporter" / "presets" / f"{args.model}-tiny"
    args.frames = args.frames or {"latte": 8, "cogvideox": 9, "opensora": 17, "wan": 9}[args.model]
    if args.vae_foreground_weight is None:
        args.vae_foreground_weight = 20.0 if args.model == "wan" else 0.0
    if args.vae_foreground_weight < 0:
        ap.error(f"--vae-foreground-weight must be >= 0 (got {args.vae_foreground_weight})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t0 = time.perf_counter()
    data = synthetic.dataset(args.clips, seed=args.seed, frames=args.frames, height=args.size, width=args.size,
                             layout=args.layout)
    clips = np.stack([c for _, c in data])
    prompts = [s.prompt for s, _ in data]
    print(f"rendered {len(prompts)} clips {clips.shape[1:]} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    log: list[dict] = []
    if args.model == "latte":
        vae, transformer, text_encoder, tokenizer, scheduler = build_components(args)
        scaling = train_vae(vae, clips, args, log)
        vae.register_to_config(scaling_factor=scaling)
        latents = encode_clips(vae, clips, scaling)
        separation = colour_separation(vae, scaling, args.frames, args.size)
        print(f"vae done: scaling_factor {scaling:.4f}, latents {tuple(latents.shape)}; colour separation in the "
              "latent (mean mse over colour pairs) " + ", ".join(f"{b} {v['mean']:.3f}" for b, v in separation.items()),
              file=sys.stderr)
        train_transformer(transformer, text_encoder, tokenizer, latents, prompts, args, log)
        from diffusers import LattePipeline

        pipe = LattePipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    else:
        separation = None
        from tools import recipes

        pipe, _ = getattr(recipes, args.model)(args, clips, prompts, log)
    # What the exporter must know of a pipeline whose defaults are a release's (WanPipeline: 81 frames of
    # 480x832, prompts padded to 512 tokens): the trained shape and text length.
    pipeline_defaults = {"num_frames": args.frames, "height": args.size, "width": args.size,
                         "max_sequence_length": recipes.WAN_TEXT_TOKENS} if args.model == "wan" else None
    seconds = time.perf_counter() - t0
    meta = {
        "command": command_line("train", argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "vae_colour_separation": separation,
        "final_loss": next(e["smoothed"] for e in reversed(log) if e["stage"] == "transformer"),
        "log": log,
        "foresight": args.foresight,
        "guidance": args.guidance,
        "pipeline_defaults": pipeline_defaults,
    }
    if args.init is not None:  # the runs this checkpoint continues, newest first (their logs left out)
        before = json.loads((args.init / "training.json").read_text()) if (args.init / "training.json").is_file() \
            else {}
        meta["continued_from"] = [{k: before.get(k) for k in ("command", "seconds", "final_loss")},
                                  *before.get("continued_from", [])]
    save_pipeline(pipe, args.out, partial(write_meta, meta=meta))
    print(f"saved {args.out} after {seconds / 60:.1f} min (final smoothed loss {meta['final_loss']:.4f})",
          file=sys.stderr)
    return meta


if __name__ == "__main__":
    main()
