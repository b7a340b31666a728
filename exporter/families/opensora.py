"""Open-Sora 1.2 (STDiT3) cut into exportable parts: stem, one part per layer (spatial block then
temporal block, both outputs Foresight probes), head; and its entry in the registry.

Layout between parts: ``(B, F, h, w, C)`` tokens, as Latte's, so the head reads the token grid
from its input's shape. The caption mask travels as float (1 = valid token; > 0.5 is valid),
the form every runtime buffer and backend already handles; layers read it from the stem's
input buffer (flow source ``input:caption_mask``).

Checkpoint folder (``--model-path DIR``), assembled from the three released repositories:
``DIR/transformer`` = hpcai-tech/OpenSora-STDiT-v3 (config.json + model.safetensors),
``DIR/vae`` = hpcai-tech/OpenSora-VAE-v1.2, ``DIR/text_encoder`` and ``DIR/tokenizer`` =
DeepFloyd/t5-v1_1-xxl, ``DIR/scheduler/scheduler_config.json`` = the rectified-flow settings
(``tools/make_tiny.py --model opensora`` writes the same layout).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit import opensora as model_code
from dit.errors import ModelError

from .base import COMPONENTS, Family, FolderComponent, IOSpec, LoadedModel, PartSpec, grid_dims

PRESETS = {"tiny": Path(__file__).resolve().parent.parent / "presets" / "opensora-tiny"}
NULL_CAPTION_FILE = "null_caption.safetensors"
# The release's sampling defaults (its v1.2 inference config).
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_FPS, DEFAULT_FRAMES = 30, 7.0, 24, 51
# 240p 9:16; the release's 426 wide is not a multiple of 16 (VAE 8 x patch 2), which the exported
# token grid needs: 432 is the nearest that is.
DEFAULT_SIZE = (240, 432)
AESTHETIC_SCORE = 6.5


def parts(model) -> list[PartSpec]:
    """The stem, ``depth`` layers and the head of an ``STDiT3``, with symbolic I/O (B batch, F latent
    frames, h/w token grid, H/W latent size = grid x patch, T caption tokens)."""
    cfg = model.config
    modules = model_code.part_modules(model)
    c, c_text = cfg.hidden_size, cfg.caption_channels
    hidden = ["B", "F", "h", "w", c]
    mask = IOSpec("caption_mask", ["B", "T"], low=0.3, high=1.3)  # random validation masks: ~80% valid
    stem = PartSpec(
        "stem", modules["stem"],
        inputs=[IOSpec("latents", ["B", cfg.in_channels, "F", "H", "W"]),
                IOSpec("timestep", ["B"], low=0.0, high=1000.0, fixed_dtype=True),
                IOSpec("caption", ["B", "T", c_text]), mask,
                IOSpec("fps", ["B"], low=24.0, high=24.0, fixed_dtype=True),
                IOSpec("height", ["B"], low=240.0, high=720.0, fixed_dtype=True),
                IOSpec("width", ["B"], low=240.0, high=1280.0, fixed_dtype=True)],
        outputs=[IOSpec("hidden", hidden), IOSpec("t_mlp", ["B", 6 * c]), IOSpec("t", ["B", c]),
                 IOSpec("y", ["B", "T", c])],
    )
    layers = [
        PartSpec(f"layer_{i:03d}", modules[f"layer_{i:03d}"],
                 inputs=[IOSpec("hidden", hidden), IOSpec("t_mlp", ["B", 6 * c]), IOSpec("y", ["B", "T", c]), mask],
                 outputs=[IOSpec("spatial", hidden), IOSpec("hidden_out", hidden)])
        for i in range(cfg.depth)
    ]
    head = PartSpec("head", modules["head"], inputs=[IOSpec("hidden", hidden), IOSpec("t", ["B", c])],
                    outputs=[IOSpec("noise_pred", ["B", cfg.out_channels, "F", "H", "W"])])
    return [stem, *layers, head]


def dims(model, max_frames: int = 16, max_grid: int = 16, max_text: int | None = None) -> dict:
    """Symbol ranges for export (the CFG batch 2 is the opt batch)."""
    _, ph, pw = model.config.patch_size
    return grid_dims((2, 4, max_frames), max_grid, max_text or model.config.model_max_length, (ph, pw))


def stacked(parts_: list[PartSpec], inputs: dict) -> torch.Tensor:
    """Run the parts in order, as the runtime does with policy none (for tests and references)."""
    stem, *layers, head = parts_
    with torch.no_grad():
        hidden, t_mlp, t, y = stem.module(*(inputs[s.name] for s in stem.inputs))
        for layer in layers:
            _, hidden = layer.module(hidden, t_mlp, y, inputs["caption_mask"])
        return head.module(hidden, t)


class OpenSoraFamily(Family):
    """Open-Sora 1.2 text-to-video (our STDiT3, our VAE, T5, rectified flow) in the registry."""

    name = "opensora"
    pipeline_class = "OpenSoraPipeline"
    transformer_class = "STDiT3"
    hub_example = "hpcai-tech/OpenSora-STDiT-v3"
    presets = PRESETS

    def load(self, model_path: str) -> LoadedModel:
        path = Path(model_path).expanduser()
        if not path.is_dir():
            raise ModelError(f"checkpoint folder {model_path} does not exist: pass an Open-Sora 1.2 folder to --model-path")
        missing = [c + "/" for c in ("transformer", *COMPONENTS) if not (path / c).is_dir()]
        if missing:
            raise ModelError(
                f"{model_path} is not a complete Open-Sora 1.2 folder: missing {', '.join(missing)}. Assemble it from "
                f"hpcai-tech/OpenSora-STDiT-v3 (transformer/), hpcai-tech/OpenSora-VAE-v1.2 (vae/), "
                f"DeepFloyd/t5-v1_1-xxl (text_encoder/, tokenizer/) and scheduler/scheduler_config.json "
                f"(see exporter/families/opensora.py)")
        transformer = model_code.load_transformer(path / "transformer")
        components = {c: FolderComponent(path / c) for c in (*COMPONENTS, "transformer")}
        return LoadedModel(transformer=transformer, source=str(path.resolve()), components=components)

    def vae_config(self, loaded: LoadedModel) -> dict:
        from dit.opensora_vae import OpenSoraVAEConfig

        return OpenSoraVAEConfig.from_dict(loaded.components["vae"].config).to_dict()

    def parts(self, model, pipeline: dict | None = None) -> list[PartSpec]:
        return parts(model)

    def dims(self, model, vae_scale_factor: int, max_scale: int = 2, pipeline: dict | None = None) -> dict:
        """Latent frames 5 (17 frames) to 30 (102 frames); the default shape (the checkpoint's
        defaults.json, else the release's 51 frames at 240p) is the opt shape, and the token grid
        goes up to ``max_scale`` times it."""
        pipeline = pipeline or {}
        _, ph, pw = model.config.patch_size
        spec = grid_dims((5, 15, 30), 2, model.config.model_max_length, (ph, pw))
        frames = pipeline.get("default_frames", DEFAULT_FRAMES)
        spec["F"]["opt"] = min(max(self._latent(frames, pipeline), 5), 30)
        for sym, size, patch in (("h", pipeline.get("default_height", DEFAULT_SIZE[0]), ph),
                                 ("w", pipeline.get("default_width", DEFAULT_SIZE[1]), pw)):
            opt = max(2, size // vae_scale_factor // patch)
            spec[sym] = {"min": 2, "opt": opt, "max": opt * max_scale}
        spec["T"]["opt"] = model.config.model_max_length  # prompts are padded to the full length
        return spec

    def video_frames(self, dims_spec: dict, pipeline: dict) -> dict:
        """Video frames per latent count: 17-frame chunks of 5 latent frames, a remainder of r
        frames ceil(r / 4) (dit.opensora_vae)."""
        micro, per_chunk = pipeline["micro_frame_size"], pipeline["micro_latent_frames"]

        def most_frames(latent: int) -> int:  # the largest frame count with at most `latent` latent frames
            full, rest = divmod(latent, per_chunk)
            return full * micro + min(micro - 1, rest * pipeline["vae_scale_factor_temporal"])

        lo = dims_spec["F"]["min"]
        smallest = next(n for n in range(1, 10 * micro) if self._latent(n, pipeline) >= lo)
        default = pipeline.get("default_frames", DEFAULT_FRAMES)
        top = most_frames(dims_spec["F"]["max"])
        return {"min": smallest, "max": top, "opt": min(max(default, smallest), top)}

    @staticmethod
    def _latent(n: int, pipeline: dict) -> int:
        """Latent frames of ``n`` video frames (the release's VAE: 17 -> 5 chunks, remainder ceil(r / 4))."""
        full, rest = divmod(n, pipeline.get("micro_frame_size", 17))
        return full * pipeline.get("micro_latent_frames", 5) + -(-rest // pipeline.get("vae_scale_factor_temporal", 4))

    def flow(self, model=None) -> dict:
        return {
            "state_init": {"hidden": "hidden"},
            "layer_inputs": {"hidden": "state:hidden", "t_mlp": "stem:t_mlp", "y": "stem:y",
                             "caption_mask": "input:caption_mask"},
            "layer_state_out": {"hidden": "hidden_out"},
            "probes": ["spatial", "hidden_out"],
            "head_inputs": {"hidden": "state:hidden", "t": "stem:t"},
            "head_output": "noise_pred",
        }

    def pipeline(self, model, vae_config: dict) -> dict:
        from dit.opensora_vae import OpenSoraVAEConfig

        vae = OpenSoraVAEConfig.from_dict(vae_config)
        cfg = model.config
        if cfg.patch_size[1] != cfg.patch_size[2]:  # the manifest states one spatial patch size
            raise ModelError(f"STDiT3 patch size {tuple(cfg.patch_size)} is not square: only square spatial patches "
                             f"(the release's (1, 2, 2)) are supported")
        return {
            "type": "opensora",
            "latent_channels": cfg.in_channels,
            "patch_size": cfg.patch_size[1],
            "vae_scale_factor": vae.spatial_factor,
            "vae_scale_factor_temporal": vae.time_factor,
            "micro_frame_size": vae.micro_frame_size,
            "micro_latent_frames": vae.micro_latent_frames,
            "max_text_length": cfg.model_max_length,
            "aesthetic_score": AESTHETIC_SCORE,  # prompt suffix " aesthetic score: 6.5."
            "default_frames": DEFAULT_FRAMES,
            "default_steps": DEFAULT_STEPS,
            "default_guidance": DEFAULT_GUIDANCE,
            "default_negative_prompt": None,  # guidance uses the model's learned null caption
            "fps": DEFAULT_FPS,
        }

    def compiled_components(self, loaded, pipeline: dict, dims_spec: dict) -> list:
        """The T5 encoder at the caption length, and the VAE's decoder (temporal, then per-frame
        spatial) for the default video: its latent frames in, ``default_frames`` frames out."""
        import transformers

        from dit.opensora_vae import load_opensora_vae

        from ..components import FramesVaeDecoderPart, text_encoder, video_decoder

        frames = pipeline["default_frames"]
        vae = load_opensora_vae(loaded.components["vae"].folder)
        encoder = transformers.T5EncoderModel.from_pretrained(loaded.components["text_encoder"].folder,
                                                              local_files_only=True)
        decoder = video_decoder(FramesVaeDecoderPart(vae, frames), pipeline["latent_channels"],
                                vae.latent_frames(frames), frames, dims_spec, pipeline["patch_size"],
                                pipeline["vae_scale_factor"])
        return [text_encoder(encoder, pipeline["max_text_length"]), decoder]

    def write_extras(self, model, folder: Path) -> dict:
        """The CFG null caption (the transformer's ``y_embedding``): the runtime feeds it to the
        unconditional half of the batch and never sees the transformer's weights."""
        from safetensors.torch import save_file

        save_file({"y_embedding": model.y_embedder.y_embedding.detach().float().contiguous()},
                  str(Path(folder) / NULL_CAPTION_FILE))
        return {"null_caption": NULL_CAPTION_FILE}

    def foresight_defaults(self) -> dict:
        # The reference implementation's Open-Sora settings; to be re-picked per model by sweep.
        return {"warmup": 8, "recalculate": 2, "threshold": 1.0}
