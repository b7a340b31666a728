"""What the tools that write checkpoints share: train.py (the Latte recipe), recipes.py (CogVideoX and
Open-Sora) and make_tiny.py (random weights) all import from here, and nothing here imports them.

The synthetic domain's text side (a word-level tokenizer, a small T5), the training draws (timesteps,
the one-colour curriculum, the learning-rate schedule), the KL-autoencoder loss, the released
CogVideoX scheduler settings, and saving a pipeline folder atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from tools import synthetic

TEXT_DIM = 64
TEXT_TOKENS = 64  # prompts are < 64 bytes
# The clips the first --curriculum steps draw from: one colour on one background, so that what the
# prompt changes is the shape and the direction.
CURRICULUM_SUBSET = {"color": "red", "background": "gray"}
# The VAEs' GroupNorm group count when --vae-norm-groups is not given (what the recorded preset commands used).
DEFAULT_VAE_NORM_GROUPS = {"latte": 16, "cogvideox": 8, "opensora": 16}
SCORE_WORDS = ("aesthetic", "score", ":", ".", *"0123456789")  # Open-Sora's " aesthetic score: 6.5." as known words

# CogVideoX's released scheduler settings (v-prediction, zero-SNR rescaled scaled-linear betas, trailing spacing).
COGVIDEOX_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
                           timestep_spacing="trailing", rescale_betas_zero_snr=True)


def vae_norm_groups(args) -> int:
    return args.vae_norm_groups or DEFAULT_VAE_NORM_GROUPS[args.model]


def t5_encoder(tokenizer):
    """The small text encoder every shipped model trains with: a 2-layer T5 over ``tokenizer``'s vocabulary
    (initialised from torch's global RNG: seed before calling)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        d_model=TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    ))


def word_tokenizer(words: list[str]):
    """A word-level tokenizer over ``words`` (lower-cased, split on whitespace and punctuation, "</s>" appended,
    unknown words -> "<unk>"), built with the tokenizers library and saved as a standard ``tokenizer.json``
    that ``AutoTokenizer.from_pretrained`` loads. Needs no downloaded vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_TOKENS)


def sample_timesteps(n: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` training timesteps in [0, 999]: uniform for ``skew`` 1 (the draw the shipped preset was
    trained with), else ``1000 * (1 - (1 - u)^skew)``, which favours high noise for ``skew`` > 1."""
    if skew == 1.0:
        return torch.randint(0, 1000, (n,), generator=gen)
    return (1000 * skew_noise(torch.rand(n, generator=gen), skew)).long().clamp_(0, 999)


def skew_noise(u: torch.Tensor, skew: float) -> torch.Tensor:
    """Uniform ``u`` in [0, 1) -> ``1 - (1 - u)^skew``: the noise level, as a fraction of the schedule, that
    sample_timesteps (discrete) and the rectified-flow recipe (continuous time) train at."""
    return u if skew == 1.0 else 1 - (1 - u) ** skew


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)


def foreground_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights of a batch ``x`` (B, C, F, H, W) in [-1, 1]: ``1 + weight`` where a pixel
    differs from its frame's median colour (the background) by more than 0.1 summed over channels, 1
    elsewhere. The synthetic clips' object covers ~3% of the pixels."""
    background = x.flatten(3).median(dim=3).values[..., None, None]
    return 1.0 + weight * ((x - background).abs().sum(dim=1, keepdim=True) > 0.1).to(x.dtype)


def kl_vae_loss(vae, x: torch.Tensor, gen: torch.Generator, kl_weight: float, foreground_weight: float = 0.0):
    """Reconstruction + a small KL term for a diffusers KL autoencoder on a batch ``x``.

    ``foreground_weight`` > 0 weights the object's pixels that much more (a weighted mean, so the loss
    keeps its scale). Wan's VAE needs it at this size: its RMS norms scale every position's features to
    one length, and with plain mse it learned the background and grey blobs where the coloured object
    was (colour 17-33% after 300-1200 steps; the same VAE with weight 20: 77% after 200)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    decoded = vae.decode(z).sample
    if foreground_weight:
        w = foreground_weights(x, foreground_weight)
        recon = (w * (decoded - x) ** 2).mean() / w.mean()
    else:
        recon = F.mse_loss(decoded, x)
    kl = posterior.kl().mean() / z[0].numel()
    return recon + kl_weight * kl, {"recon": recon.item(), "kl": kl.item()}


def curriculum_indices(prompts: list[str]) -> torch.Tensor:
    """Indices of the clips in CURRICULUM_SUBSET (one colour, one background), for the first --curriculum steps."""
    keep = [i for i, p in enumerate(prompts)
            if all(synthetic.parse_prompt(p)[k] == v for k, v in CURRICULUM_SUBSET.items())]
    if not keep:
        raise ValueError(f"no clip is {CURRICULUM_SUBSET}: render more clips (--clips) or pass --curriculum 0")
    return torch.tensor(keep)


def skew_at(step: int, args) -> float:
    """The timestep skew of training step ``step``: --curriculum-skew during the curriculum, else --timestep-skew."""
    return args.curriculum_skew if step < args.curriculum else args.timestep_skew


def draw_clips(step: int, args, subset: torch.Tensor | None, n: int, gen: torch.Generator) -> torch.Tensor:
    """The clip indices of training step ``step``'s batch: from ``subset`` during the curriculum, else from
    all ``n``."""
    if step < args.curriculum:
        return subset[torch.randint(0, subset.shape[0], (args.batch,), generator=gen)]
    return torch.randint(0, n, (args.batch,), generator=gen)


def save_pipeline(pipe, out: Path, extra: Callable[[Path], None] | None = None) -> Path:
    """``pipe.save_pretrained`` (then ``extra(folder)`` for any more files) into a temporary sibling, renamed
    into place: ``out`` is the complete new checkpoint or the old one, never half of either."""
    from runtime.outputs import staged_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for config in tmp.glob("*/config.json"):  # a continued checkpoint's would name the folder it came from
            data = json.loads(config.read_text())
            if data.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if extra is not None:
            extra(tmp)
    return out
