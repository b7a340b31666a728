"""CogVideoX (diffusers ``CogVideoXTransformer3DModel``) cut into exportable parts.

Layers carry two tensors: the video tokens (the Foresight probe) and the text tokens (cached
and restored with them). Position information that depends on the shape is computed by the
runtime's pipeline once per shape and bound as an input, laid out per token grid so every
shape is a product of the manifest's symbols:

- rotary configurations (CogVideoX-5B): cos/sin tables ``(F, h, w, head_dim)``, an input of
  every layer, as CogVideoXPipeline computes them outside the transformer;
- sin-cos configurations (CogVideoX-2B): the 3D table ``(F, h, w, D)``, an input of the stem.
  diffusers' patch embedding picks between a table precomputed at the training size and one
  computed for the input size; both come from the same function, which the pipeline calls.

CogVideoX 1.5 (temporal patches) and learned position tables (5B-I2V, fixed size) are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dit import cogvideox as model_code
from dit.errors import ModelError

from .base import Family, IOSpec, PartSpec, grid_dims, load_components


def check_supported(cfg) -> None:
    if cfg.patch_size_t is not None:
        raise NotImplementedError("CogVideoX 1.5 (patch_size_t) is not supported yet: only CogVideoX 1.0 (2B, 5B)")
    if cfg.use_learned_positional_embeddings:
        raise NotImplementedError("learned position tables (CogVideoX-5B-I2V) are not supported: only text-to-video "
                                  "configurations (2B sin-cos, 5B rotary)")


def parts(model) -> list[PartSpec]:
    cfg = model.config
    check_supported(cfg)
    modules = model_code.part_modules(model)
    rotary_config = cfg.use_rotary_positional_embeddings
    d = cfg.num_attention_heads * cfg.attention_head_dim
    e, c_in, c_out = cfg.time_embed_dim, cfg.in_channels, cfg.out_channels
    hidden, text = ["B", "F", "h", "w", d], ["B", "T", d]
    shape_inputs = pipeline_inputs(model)
    stem_inputs = [IOSpec("latents", ["B", "F", c_in, "H", "W"]),
                   IOSpec("timestep", ["B"], low=0.0, high=1000.0, fixed_dtype=True),
                   IOSpec("encoder_hidden_states", ["B", "T", cfg.text_embed_dim])]
    stem = PartSpec("stem", modules["stem"], inputs=stem_inputs + ([] if rotary_config else shape_inputs),
                    outputs=[IOSpec("hidden", hidden), IOSpec("text", text), IOSpec("temb", ["B", e])])
    layers = [PartSpec(f"layer_{i:03d}", modules[f"layer_{i:03d}"],
                       inputs=[IOSpec("hidden", hidden), IOSpec("text", text), IOSpec("temb", ["B", e]),
                               *(shape_inputs if rotary_config else [])],
                       outputs=[IOSpec("hidden_out", hidden), IOSpec("text_out", text)])
              for i in range(cfg.num_layers)]
    head = PartSpec("head", modules["head"], inputs=[IOSpec("hidden", hidden), IOSpec("temb", ["B", e])],
                    outputs=[IOSpec("noise_pred", ["B", "F", c_out, "H", "W"])])
    return [stem, *layers, head]


def pipeline_inputs(model) -> list[IOSpec]:
    """What the runtime's pipeline computes per shape: rotary tables or the sin-cos table."""
    cfg = model.config
    if cfg.use_rotary_positional_embeddings:
        return [IOSpec("rotary_cos", ["F", "h", "w", cfg.attention_head_dim]),
                IOSpec("rotary_sin", ["F", "h", "w", cfg.attention_head_dim])]
    return [IOSpec("pos_embedding", ["F", "h", "w", cfg.num_attention_heads * cfg.attention_head_dim])]


def latent_frames(frames: int, ratio: int = 4) -> int:
    return (frames - 1) // ratio + 1


def dims(model, max_frames: int = 13, max_grid: int = 16) -> dict:
    p = model.config.patch_size
    return grid_dims((1, 2, max_frames), max_grid, model.config.max_text_seq_length, (p, p))


def stacked(parts_: list[PartSpec], inputs: dict) -> torch.Tensor:
    """Run the parts in order with every layer computed (policy none)."""
    stem, *layers, head = parts_
    with torch.no_grad():
        hidden, text, temb = stem.module(*(inputs[s.name] for s in stem.inputs))
        for layer in layers:
            hidden, text = layer.module(hidden, text, temb, *(inputs[s.name] for s in layer.inputs[3:]))
        return head.module(hidden, temb)


PRESETS = {"tiny": Path(__file__).resolve().parent.parent / "presets" / "cogvideox-tiny",
           "tiny-5b": Path(__file__).resolve().parent.parent / "presets" / "cogvideox-tiny-5b"}


class CogVideoXFamily(Family):
    """CogVideoX 1.0 text-to-video (2B sin-cos, 5B rotary) in the registry."""

    name = "cogvideox"
    pipeline_class = "CogVideoXPipeline"
    transformer_class = "CogVideoXTransformer3DModel"
    hub_example = "THUDM/CogVideoX-2b"
    presets = PRESETS

    def load(self, model_path: str):
        from diffusers import CogVideoXTransformer3DModel

        loaded = load_components(self, model_path, CogVideoXTransformer3DModel)
        try:
            check_supported(loaded.transformer.config)
        except NotImplementedError as exc:
            raise ModelError(f"{model_path}: {exc}") from None
        return loaded

    def parts(self, model, pipeline: dict | None = None) -> list[PartSpec]:
        return parts(model)

    def dims(self, model, vae_scale_factor: int, max_scale: int = 2, pipeline: dict | None = None) -> dict:
        """The training size is the opt shape; up to ``max_scale`` times it, and at least the
        13 latent frames (49 video frames) of the released models."""
        cfg = model.config
        p = cfg.patch_size
        frames = latent_frames(cfg.sample_frames, cfg.temporal_compression_ratio)
        spec = grid_dims((1, frames, max(13, frames)), 2, cfg.max_text_seq_length, (p, p))
        for sym, size in (("h", cfg.sample_height), ("w", cfg.sample_width)):
            spec[sym] = {"min": 2, "opt": size // p, "max": size // p * max_scale}
        # CogVideoXPipeline always pads the prompt to max_text_seq_length tokens (the opt shape);
        # shorter prompt embeddings stay possible for callers that bring their own.
        spec["T"]["opt"] = cfg.max_text_seq_length
        return spec

    def flow(self, model) -> dict:
        tables = pipeline_inputs(model)
        per_layer = tables if model.config.use_rotary_positional_embeddings else []
        return {
            "pipeline_inputs": [s.to_dict() for s in tables],
            "state_init": {"hidden": "hidden", "text": "text"},
            "layer_inputs": {"hidden": "state:hidden", "text": "state:text", "temb": "stem:temb",
                             **{s.name: f"pipeline:{s.name}" for s in per_layer}},
            "layer_state_out": {"hidden": "hidden_out", "text": "text_out"},
            "probes": ["hidden_out"],
            "head_inputs": {"hidden": "state:hidden", "temb": "stem:temb"},
            "head_output": "noise_pred",
        }

    def pipeline(self, model, vae_config: dict) -> dict:
        cfg = model.config
        return {
            "type": "cogvideox",
            "latent_channels": cfg.in_channels,
            "patch_size": cfg.patch_size,
            "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
            "vae_scale_factor_temporal": vae_config.get("temporal_compression_ratio", 4),
            "vae_scaling_factor": vae_config.get("scaling_factor", 1.15258426),
            "max_text_length": cfg.max_text_seq_length,
            "positional": "rotary" if cfg.use_rotary_positional_embeddings else "sincos",
            "head_dim": cfg.attention_head_dim,
            "hidden_size": cfg.num_attention_heads * cfg.attention_head_dim,
            "base_grid": [cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size],
            "spatial_interpolation_scale": cfg.spatial_interpolation_scale,
            "temporal_interpolation_scale": cfg.temporal_interpolation_scale,
            "use_dynamic_cfg": False,
            "default_frames": cfg.sample_frames,
            "default_steps": 50,
            "default_guidance": 6.0,
            "default_negative_prompt": "",
            "fps": 8,
        }

    def compiled_components(self, loaded, pipeline: dict, dims_spec: dict) -> list:
        """The T5 encoder at the padded length (called with an all-ones mask: the pipeline passes none),
        and AutoencoderKLCogVideoX's decoder for the default video's latent frames, on latents the
        runtime has scaled and put channels first."""
        from ..components import VaeDecoderPart, text_encoder, video_decoder

        ratio = pipeline["vae_scale_factor_temporal"]
        latent = latent_frames(pipeline["default_frames"], ratio)
        frames = ratio * (latent - 1) + 1 if latent % 2 else ratio * latent  # the VAE's frame rule
        decoder = video_decoder(VaeDecoderPart(loaded.components["vae"]), pipeline["latent_channels"], latent,
                                frames, dims_spec, pipeline["patch_size"], pipeline["vae_scale_factor"])
        return [text_encoder(loaded.components["text_encoder"], pipeline["max_text_length"]), decoder]

    def foresight_defaults(self) -> dict:
        # The reference implementation's evaluation settings; to be re-picked per model by sweep.
        return {"warmup": 8, "recalculate": 2, "threshold": 0.5}
