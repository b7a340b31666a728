"""Latte (diffusers ``LatteTransformer3DModel``) in the registry: loading, the part list with
symbolic I/O, dims, flow and pipeline facts. The part modules are :mod:`dit.latte`."""

from __future__ import annotations

from pathlib import Path

from dit import latte as model_code

from .base import Family, IOSpec, PartSpec, load_components

PRESETS = {"tiny": Path(__file__).resolve().parent.parent / "presets" / "latte-tiny"}

# Latte-1's pipeline: T5 prompts of at most 120 tokens, truncated to the prompt's length.
MAX_TEXT_LENGTH = 120


class LatteFamily(Family):
    name = "latte"
    pipeline_class = "LattePipeline"
    transformer_class = "LatteTransformer3DModel"
    hub_example = "maxin-cn/Latte-1"
    presets = PRESETS

    def load(self, model_path: str):
        from diffusers import LatteTransformer3DModel

        return load_components(self, model_path, LatteTransformer3DModel)

    def parts(self, model, pipeline: dict | None = None) -> list[PartSpec]:
        cfg = model.config
        modules = model_code.part_modules(model)
        d = cfg.num_attention_heads * cfg.attention_head_dim
        c_in, c_out, c_text = cfg.in_channels, model.out_channels, cfg.caption_channels
        hidden = ["B", "F", "h", "w", d]
        stem = PartSpec(
            "stem", modules["stem"],
            inputs=[IOSpec("latents", ["B", c_in, "F", "H", "W"]),
                    IOSpec("timestep", ["B"], low=0.0, high=float(cfg.num_embeds_ada_norm or 1000),
                           fixed_dtype=True),
                    IOSpec("encoder_hidden_states", ["B", "T", c_text])],
            outputs=[IOSpec("hidden", hidden), IOSpec("temb", ["B", 6 * d]),
                     IOSpec("embedded_timestep", ["B", d]), IOSpec("text", ["B", "T", d])],
        )
        layers = [
            PartSpec(
                f"layer_{i:03d}", modules[f"layer_{i:03d}"],
                inputs=[IOSpec("hidden", hidden), IOSpec("temb", ["B", 6 * d]), IOSpec("text", ["B", "T", d])],
                outputs=[IOSpec("spatial", hidden), IOSpec("hidden_out", hidden)],
            )
            for i in range(cfg.num_layers)
        ]
        head = PartSpec(
            "head", modules["head"],
            inputs=[IOSpec("hidden", hidden), IOSpec("embedded_timestep", ["B", d])],
            outputs=[IOSpec("noise_pred", ["B", c_out, "F", "H", "W"])],
        )
        return [stem, *layers, head]

    def dims(self, model, vae_scale_factor: int, max_scale: int = 2, pipeline: dict | None = None) -> dict:
        """Symbol ranges. Base symbols are free; H and W (latent size) derive from the token grid."""
        cfg = model.config
        p = cfg.patch_size
        # The temporal position table has video_length rows; Latte adds it only when F > 1.
        grid_max = cfg.sample_size * max_scale // p
        return {
            "B": {"min": 1, "opt": 2, "max": 2},
            "F": {"min": 2, "opt": cfg.video_length, "max": cfg.video_length},
            "h": {"min": 2, "opt": cfg.sample_size // p, "max": grid_max},
            "w": {"min": 2, "opt": cfg.sample_size // p, "max": grid_max},
            "T": {"min": 1, "opt": 16, "max": MAX_TEXT_LENGTH},
            "H": {"of": "h", "times": p},
            "W": {"of": "w", "times": p},
        }

    def flow(self, model=None) -> dict:
        return {
            "state_init": {"hidden": "hidden"},
            "layer_inputs": {"hidden": "state:hidden", "temb": "stem:temb", "text": "stem:text"},
            "layer_state_out": {"hidden": "hidden_out"},
            "probes": ["spatial", "hidden_out"],
            "head_inputs": {"hidden": "state:hidden", "embedded_timestep": "stem:embedded_timestep"},
            "head_output": "noise_pred",
        }

    def pipeline(self, model, vae_config: dict) -> dict:
        cfg = model.config
        return {
            "type": "latte",
            "latent_channels": cfg.in_channels,
            "patch_size": cfg.patch_size,
            "vae_scale_factor": 2 ** (len(vae_config["block_out_channels"]) - 1),
            "vae_scaling_factor": vae_config.get("scaling_factor", 0.18215),
            "max_text_length": MAX_TEXT_LENGTH,
            "mask_text": True,
            "default_frames": cfg.video_length,
            "default_steps": 50,
            "default_guidance": 7.5,
            "default_negative_prompt": "",
            "decode_chunk_size": 14,
            "fps": 8,
        }

    def compiled_components(self, loaded, pipeline: dict, dims_spec: dict) -> list:
        from ..components import VaeDecoderPart, scaled_range, text_encoder

        encoder, vae = loaded.components["text_encoder"], loaded.components["vae"]
        # Per-frame 2D decoding in chunks of decode_chunk_size frames, at every latent size the layers take.
        patch, scale = pipeline["patch_size"], pipeline["vae_scale_factor"]
        chunk = pipeline["decode_chunk_size"]
        latent_h, latent_w = scaled_range(dims_spec["h"], patch), scaled_range(dims_spec["w"], patch)
        decoder = PartSpec("vae_decoder", VaeDecoderPart(vae).float().eval(),
                           inputs=[IOSpec("latents", ["B", pipeline["latent_channels"], "h", "w"], fixed_dtype=True)],
                           outputs=[IOSpec("images", ["B", 3, "Y", "X"], fixed_dtype=True)])
        vae_dims = {"B": {"min": 1, "opt": min(chunk, dims_spec["F"]["opt"]), "max": chunk}, "h": latent_h,
                    "w": latent_w, "Y": {"of": "h", "times": scale}, "X": {"of": "w", "times": scale}}
        return [text_encoder(encoder, MAX_TEXT_LENGTH), (decoder, vae_dims)]

    def foresight_defaults(self) -> dict:
        # The reference implementation's evaluation settings; to be re-picked per model by sweep.
        return {"warmup": 8, "recalculate": 2, "threshold": 0.5}
