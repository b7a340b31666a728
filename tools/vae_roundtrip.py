"""How much of a clip survives a trained video VAE: decode(encode(clip)) of held-out synthetic clips,
scored like generated videos (colour and direction by tools/evaluate.score_clip) plus the mse.

    python -m tools.vae_roundtrip --vae /tmp/exp/wan-fg/vae --family wan [--clips 64] [--picture vae.png]

A transformer trained on a VAE's latents cannot follow a colour or a direction the VAE's own round
trip loses, so this is the first thing to check when a trained preset ignores its prompt. The
clips are rendered with a seed the training never uses (99) and the layout given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tools import evaluate, synthetic
from tools.recipes import videos

VAE_CLASSES = {"wan": "AutoencoderKLWan", "cogvideox": "AutoencoderKLCogVideoX"}
CLIP_SEED = 99


def load_vae(path: Path, family: str):
    import diffusers

    return getattr(diffusers, VAE_CLASSES[family]).from_pretrained(path).eval()


@torch.no_grad()
def roundtrip(vae, clips: np.ndarray, batch: int = 8) -> np.ndarray:
    """uint8 (N, F, H, W, 3) -> the VAE's reconstruction of each, uint8, same shape."""
    out = []
    for i in range(0, len(clips), batch):
        x = videos(clips, np.arange(i, min(i + batch, len(clips))))
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        out.append(((rec.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


def score(clips: np.ndarray, recon: np.ndarray, prompts: list[str]) -> dict:
    rows = [evaluate.score_clip(f, p) for f, p in zip(recon, prompts)]
    diff = (clips.astype(np.float32) - recon.astype(np.float32)) / 127.5
    return {"clips": len(rows), "colour": float(np.mean([r["color_ok"] for r in rows])),
            "direction": float(np.mean([r["direction_ok"] for r in rows])), "mse": float(np.mean(diff ** 2))}


def picture(clips: np.ndarray, recon: np.ndarray, path: Path, n: int = 6) -> None:
    """Rows: clips, each beside its reconstruction (first, middle and last frames), 3x enlarged."""
    import imageio.v3 as iio

    frames = sorted({0, clips.shape[1] // 2, clips.shape[1] - 1})
    rows = [np.concatenate([np.concatenate([v[k, t] for t in frames], axis=1) for v in (clips, recon)], axis=1)
            for k in range(min(n, len(clips)))]
    iio.imwrite(path, np.concatenate(rows, axis=0).repeat(3, 0).repeat(3, 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", type=Path, required=True, help="a saved diffusers VAE folder (a checkpoint's vae/)")
    ap.add_argument("--family", choices=sorted(VAE_CLASSES), required=True)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--layout", choices=synthetic.LAYOUTS, default="cross")
    ap.add_argument("--picture", type=Path, default=None, help="write a PNG of clips beside their round trips")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    data = synthetic.dataset(args.clips, seed=CLIP_SEED, frames=args.frames, height=args.size, width=args.size,
                             layout=args.layout)
    clips = np.stack([c for _, c in data])
    recon = roundtrip(load_vae(args.vae, args.family), clips)
    result = {"vae": str(args.vae), **score(clips, recon, [s.prompt for s, _ in data])}
    print(json.dumps(result, indent=1))
    if args.picture:
        picture(clips, recon, args.picture)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
