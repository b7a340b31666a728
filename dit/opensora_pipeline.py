"""Open-Sora 1.2 text-to-video, eager: the reference a compiled runtime is compared against.

Open-Sora is not in diffusers, so this module is its pipeline: T5 caption, rectified-flow
sampling of :class:`~dit.stdit3.STDiT3` with classifier-free guidance, the
Open-Sora VAE, frames. It follows the release's ``scripts/inference.py`` (v1.2.0), except
that everything runs in float32 (the release runs STDiT3 and the VAE in bf16, T5 in fp32).

Folder layout (:meth:`OpenSoraPipeline.from_pretrained`; also what
``tools/make_tiny.py --model opensora`` writes)::

    DIR/model_index.json           {"_class_name": "OpenSoraPipeline",
                                    "transformer": ["foresight", "STDiT3"], "vae": ["foresight", "OpenSoraVAE"],
                                    "text_encoder": ["transformers", "T5EncoderModel"],
                                    "tokenizer": ["transformers", <tokenizer class>],
                                    "scheduler": ["foresight", "RFlowSampler"]}
    DIR/transformer/               config.json (STDiT3Config fields, others ignored) + model.safetensors
                                   (hpcai-tech/OpenSora-STDiT-v3 as downloaded)
    DIR/vae/                       [config.json (OpenSoraVAEConfig fields)] + model.safetensors
                                   (hpcai-tech/OpenSora-VAE-v1.2 as downloaded)
    DIR/text_encoder/, tokenizer/  DeepFloyd/t5-v1_1-xxl (T5EncoderModel / AutoTokenizer)
    DIR/scheduler/scheduler_config.json
                                   {"_class_name": "RFlowSampler", "num_steps": 30, "guidance_scale": 7.0,
                                    "use_timestep_transform": true, "num_timesteps": 1000}
    DIR/defaults.json              optional: {"num_frames", "height", "width"} defaults of __call__
                                   (and "guidance_scale" / "num_inference_steps" overriding the
                                   scheduler's, as foresight-export reads that file)

Semantics of one generation (``pipe(prompt, num_frames, height, width, seed=...)``):

1. Caption (:meth:`OpenSoraPipeline.encode_prompt`): ``text = prompt + " aesthetic score: 6.5."``
   (the release's ``append_score_to_prompts``: ``f" aesthetic score: {aes:.1f}."``, skipped when
   the prompt already says "aesthetic score:", none with ``aesthetic_score=None``); the tokenizer
   pads/truncates to ``transformer.config.model_max_length`` tokens (300) with special tokens;
   ``y = T5(ids, attention_mask).last_hidden_state`` ``(1, L, C)`` fp32, ``mask (1, L)`` long.
2. CFG batch ``[conditional, unconditional]`` (the release's order): the unconditional caption
   is the transformer's learned ``y_embedder.y_embedding`` ``(L, C)`` with the prompt's mask,
   so it attends to the same first ``sum(mask)`` rows (:func:`~dit.stdit3.cfg_model_fn`).
3. Noise ``(1, 4, vae.latent_frames(num_frames), height // 8, width // 8)`` from
   ``torch.randn(generator=torch.Generator("cpu").manual_seed(seed), dtype=float32)``.
4. Timesteps ``RFlowSampler.timesteps(height, width, num_frames)`` (each a ``(1,)`` fp32 tensor;
   pixel sizes as fp32 tensors), then :meth:`RFlowSampler.sample`: per step the model gets
   ``z_in = cat(z, z)``, ``t_in = cat(t, t)``, ``y = cat(y, y_null)[:, None]``,
   ``mask = cat(mask, mask)``, ``fps``, ``height``, ``width`` as ``(2,)`` fp32 tensors;
   ``v = v_u + g (v_c - v_u)`` on output channels ``:4``; ``z += v dt``,
   ``dt = (t_i - t_{i+1}) / 1000`` (last ``t_last / 1000``).
   fps is 24 for a video and 120 for a single frame (the release's ``IMG_FPS``) unless given.
5. ``video = vae.decode(z, num_frames)`` ``(1, 3, F, 8 (height // 8), 8 (width // 8))``; frames
   as the release's ``save_sample``: ``x.clamp(-1, 1)``, ``(x + 1) / 2``, ``* 255 + 0.5``,
   ``clamp(0, 255)``, cast to uint8 (truncation, i.e. floor) -> ``(F, H, W, 3)``.

The release's defaults are 51 frames (2 s) at 240p 9:16, i.e. 240 x 426; 426 is not a multiple
of 8, so the latent is 53 wide and the frames 424 (as the release saves them).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import torch

from dit.opensora_vae import OpenSoraVAE, load_opensora_vae
from dit.rflow import RFlowSampler
from dit.stdit3 import WEIGHT_FILES, STDiT3, cfg_model_fn, load_stdit3
from dit.errors import ModelError

AESTHETIC_SCORE = 6.5
VIDEO_FPS = 24
IMAGE_FPS = 120  # the release conditions a single frame on fps 120 (IMG_FPS)
RELEASE_SHAPE = {"num_frames": 51, "height": 240, "width": 426}  # 2 s at 240p 9:16
DEFAULTS_FILE = "defaults.json"
SCHEDULER_FILE = "scheduler_config.json"

ASSEMBLE = (
    "assemble the folder from the released pieces: transformer/ = hpcai-tech/OpenSora-STDiT-v3 "
    "(config.json, model.safetensors), vae/ = hpcai-tech/OpenSora-VAE-v1.2 (model.safetensors), "
    "text_encoder/ and tokenizer/ = DeepFloyd/t5-v1_1-xxl (T5EncoderModel, tokenizer files), "
    f"scheduler/{SCHEDULER_FILE} = " + json.dumps({"_class_name": "RFlowSampler", "num_steps": 30,
                                                   "guidance_scale": 7.0, "use_timestep_transform": True,
                                                   "num_timesteps": 1000})
    + ', model_index.json = {"_class_name": "OpenSoraPipeline", ...} (see dit/opensora_pipeline.py); '
    "or write a tiny random one with tools/make_tiny.py --model opensora --out DIR"
)


def scheduler_to_dict(scheduler: RFlowSampler) -> dict:
    return {"_class_name": "RFlowSampler", **dataclasses.asdict(scheduler)}


def scheduler_from_dict(d: Mapping) -> RFlowSampler:
    names = {f.name for f in dataclasses.fields(RFlowSampler)}
    return RFlowSampler(**{k: v for k, v in d.items() if k in names})


def append_score(prompt: str, aesthetic_score: float | None) -> str:
    """The release's ``append_score_to_prompts`` for the aesthetic score (no motion score)."""
    if aesthetic_score is None or "aesthetic score:" in prompt:
        return prompt
    return f"{prompt} aesthetic score: {aesthetic_score:.1f}."


def to_frames(video: torch.Tensor):
    """``(1, 3, F, H, W)`` about [-1, 1] -> uint8 ``(F, H, W, 3)`` numpy, as the release's ``save_sample``."""
    x = video[0].float().clamp(-1, 1)
    x = (x + 1) / 2  # the release: x.sub_(low).div_(high - low)
    x = x.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 3, 0)  # (F, H, W, 3)
    return x.to(torch.uint8).cpu().numpy()  # truncates: floor, as values are >= 0


def _missing_pieces(root: Path) -> list[str]:
    """What :meth:`OpenSoraPipeline.from_pretrained` needs and ``root`` lacks."""
    def any_file(folder: Path, names) -> bool:
        return any((folder / n).is_file() for n in names)

    missing = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for part in ("transformer", "vae"):
        if not any_file(root / part, WEIGHT_FILES):
            missing.append(f"{part}/ weights (one of {', '.join(WEIGHT_FILES)})")
    te = root / "text_encoder"
    if not (te / "config.json").is_file() or not (any(te.glob("*.safetensors")) or any(te.glob("*.bin"))):
        missing.append("text_encoder/ (config.json and weights of a transformers T5EncoderModel)")
    if not any_file(root / "tokenizer", ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        missing.append("tokenizer/ (tokenizer.json, tokenizer_config.json or spiece.model)")
    if not (root / "scheduler" / SCHEDULER_FILE).is_file():
        missing.append(f"scheduler/{SCHEDULER_FILE}")
    return missing


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return d
    except ValueError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}): fix it or write it again") from exc


class OpenSoraPipeline:
    """T5 + STDiT3 + rectified flow + Open-Sora VAE; one call is one video (module docstring)."""

    def __init__(self, transformer: STDiT3, vae: OpenSoraVAE, text_encoder, tokenizer,
                 scheduler: RFlowSampler | None = None, *, aesthetic_score: float | None = AESTHETIC_SCORE,
                 defaults: Mapping | None = None):
        self.transformer, self.vae = transformer.eval(), vae.eval()
        self.text_encoder, self.tokenizer = text_encoder.eval(), tokenizer
        self.scheduler = scheduler or RFlowSampler()
        self.aesthetic_score = aesthetic_score
        # __call__'s defaults: the release's shape, overridden by the folder's defaults.json
        self.defaults = {**RELEASE_SHAPE, **(defaults or {})}

    # ----------------------------------------------------------------------- files

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "OpenSoraPipeline":
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ModelError(f"Open-Sora pipeline folder {root} does not exist: {ASSEMBLE}")
        missing = _missing_pieces(root)
        if missing:
            raise ModelError(f"{root} is not a complete Open-Sora pipeline folder, missing: "
                             f"{'; '.join(missing)}. To fix, {ASSEMBLE}")
        index = _read_json(root / "model_index.json")
        if index.get("_class_name") != "OpenSoraPipeline":
            raise ModelError(f"{root / 'model_index.json'} names {index.get('_class_name')!r}, not OpenSoraPipeline: "
                             f"pass an Open-Sora 1.2 folder ({ASSEMBLE})")
        from transformers import AutoTokenizer, T5EncoderModel

        try:
            scheduler = scheduler_from_dict(_read_json(root / "scheduler" / SCHEDULER_FILE))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{root / 'scheduler' / SCHEDULER_FILE}: {exc}") from exc
        defaults = {}
        if (root / DEFAULTS_FILE).is_file():
            d = _read_json(root / DEFAULTS_FILE)
            defaults = {k: d[k] for k in (*RELEASE_SHAPE, "guidance_scale", "num_inference_steps") if k in d}
        transformer = load_stdit3(root / "transformer")
        vae = load_opensora_vae(root / "vae")
        # float32 as the release runs T5 (transformers 5 would otherwise keep the file's dtype)
        text_encoder = T5EncoderModel.from_pretrained(root / "text_encoder").float()
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        kwargs.setdefault("defaults", defaults)
        return cls(transformer, vae, text_encoder, tokenizer, scheduler, **kwargs)

    def save_pretrained(self, path, safe_serialization: bool = True) -> Path:
        """Write the folder layout of the module docstring (``defaults.json`` only for a
        non-release default shape)."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("OpenSoraPipeline saves safetensors only")
        root = Path(path)
        index = {"_class_name": "OpenSoraPipeline", "transformer": ["foresight", "STDiT3"],
                 "vae": ["foresight", "OpenSoraVAE"], "text_encoder": ["transformers", "T5EncoderModel"],
                 "tokenizer": ["transformers", type(self.tokenizer).__name__],
                 "scheduler": ["foresight", "RFlowSampler"]}
        configs = {"transformer": {"architectures": ["STDiT3"], "model_type": "STDiT3",
                                   **self.transformer.config.to_dict()},
                   "vae": self.vae.config.to_dict()}
        for name, model in (("transformer", self.transformer), ("vae", self.vae)):
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "config.json").write_text(json.dumps(configs[name], indent=2) + "\n")
            sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(sd, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        self.text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(root / "tokenizer")
        (root / "scheduler").mkdir(parents=True, exist_ok=True)
        (root / "scheduler" / SCHEDULER_FILE).write_text(json.dumps(scheduler_to_dict(self.scheduler), indent=2) + "\n")
        (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.defaults != RELEASE_SHAPE:
            (root / DEFAULTS_FILE).write_text(json.dumps(self.defaults, indent=2) + "\n")
        return root

    def to(self, device) -> "OpenSoraPipeline":
        for m in (self.transformer, self.vae, self.text_encoder):
            m.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.x_embedder.proj.weight.device

    # ----------------------------------------------------------------------- generation

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompt`` -> ``(y (1, L, C) fp32, mask (1, L) long)``, L = ``model_max_length``."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        tokens = self.tokenizer(append_score(prompt, self.aesthetic_score),
                                max_length=self.transformer.config.model_max_length, padding="max_length",
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.text_encoder.device)
        mask = tokens["attention_mask"].to(self.text_encoder.device)
        y = self.text_encoder(ids, attention_mask=mask).last_hidden_state.float()  # (1, L, C)
        return y, mask.long()

    def null_caption(self) -> torch.Tensor:
        """CFG's unconditional caption ``(1, L, C)``: the learned ``y_embedding``."""
        return self.transformer.y_embedder.y_embedding[None]

    @torch.no_grad()
    def __call__(self, prompt: str, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, fps: float | None = None,
                 output_type: str = "np"):
        """One video: uint8 frames ``(F, 8 (H // 8), 8 (W // 8), 3)`` (``"np"``) or the final
        latents ``(1, 4, F', H // 8, W // 8)`` fp32 (``"latent"``). None = the folder's defaults
        (``defaults.json``, else the release's 51 x 240 x 426), the scheduler's steps and guidance."""
        d = self.defaults
        num_frames = d["num_frames"] if num_frames is None else num_frames
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type {output_type!r}: pass 'np' (uint8 frames) or 'latent'")
        factor = self.vae.config.spatial_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < factor:
                raise ValueError(f"{name} must be an int >= {factor} (the VAE's spatial factor), got {v!r}")
        latent_frames = self.vae.latent_frames(num_frames)  # validates num_frames
        if num_inference_steps is None:
            num_inference_steps = d.get("num_inference_steps", self.scheduler.num_steps)
        if guidance_scale is None:
            guidance_scale = d.get("guidance_scale", self.scheduler.guidance_scale)
        sampler = dataclasses.replace(self.scheduler, num_steps=num_inference_steps,
                                      guidance_scale=float(guidance_scale))  # validates num_steps
        if fps is None:
            fps = VIDEO_FPS if num_frames > 1 else IMAGE_FPS
        device = self.device

        y, mask = self.encode_prompt(prompt)
        y, mask = y.to(device), mask.to(device)
        shape = (1, self.transformer.config.in_channels, latent_frames, height // factor, width // factor)
        z = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32).to(device)
        size = {k: torch.tensor([float(v)], dtype=torch.float32, device=device)
                for k, v in (("height", height), ("width", width), ("num_frames", num_frames))}
        timesteps = sampler.timesteps(size["height"], size["width"], size["num_frames"], device=device)
        model_fn = cfg_model_fn(self.transformer, y[:, None], mask, fps=torch.tensor([float(fps)], device=device),
                                height=size["height"], width=size["width"])
        z = sampler.sample(model_fn, z, timesteps)  # (1, 4, F', h, w)
        if output_type == "latent":
            return z
        return to_frames(self.vae.decode(z, num_frames))
