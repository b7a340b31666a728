"""Wan 2.1 and Wan 2.2 A14B (diffusers ``WanTransformer3DModel`` in a ``WanPipeline`` checkpoint) cut
into exportable parts.

One tensor flows between layers, the video tokens on their grid ``(B, F, h, w, D)``: the state
and the Foresight probe. The projected text and the timestep projection are stem outputs every
layer reads; the rotary tables are computed inside each layer from its grid (``dit/wan.py``).

Wan 2.2 A14B's second transformer (``transformer_2``, the low-noise expert WanPipeline switches
to below ``boundary_ratio * num_train_timesteps``) is exported as the folder's second expert: the
same parts in other files (docs/engines-format.md §10).

Wan 2.2 TI2V-5B's per-token timesteps (``expand_timesteps``) make the stem's ``timestep`` input one
value per token on the grid ``(B, F, h, w)`` and its timestep embedding and projection per token.

Not supported, refused by name: image conditioning (I2V).
"""

from __future__ import annotations

import json
from pathlib import Path

from dit import wan as model_code
from dit.errors import ModelError

from .base import Family, IOSpec, PartSpec, load_components

PRESETS = {# trained on the synthetic domain (tools/train.py --model wan; BENCHMARKS.md)
           "tiny": Path(__file__).resolve().parent.parent / "presets" / "wan-tiny",
           "tiny-random": Path(__file__).resolve().parent.parent / "presets" / "wan-tiny-random",
           # Wan 2.2 T2V-A14B's layout (two experts, boundary_ratio, UniPC): random weights
           "tiny-random-a14b": Path(__file__).resolve().parent.parent / "presets" / "wan-tiny-random-a14b",
           # Wan 2.2 TI2V-5B's layout (per-token timesteps, the Wan 2.2 VAE): random weights
           "tiny-random-ti2v": Path(__file__).resolve().parent.parent / "presets" / "wan-tiny-random-ti2v"}
MAX_TEXT_TOKENS = 512  # WanPipeline's default max_sequence_length (UMT5)


def pipeline_config(model_path: str) -> dict:
    """The checkpoint's ``model_index.json`` (WanPipeline's config: ``boundary_ratio``, ``transformer_2``, ...)."""
    index = Path(model_path) / "model_index.json"
    try:
        if not Path(model_path).is_dir():  # a hub id (load_components has fetched it already: cached)
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(model_path, "model_index.json"))
        return json.loads(index.read_text()) if index.is_file() else {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{index} is not valid JSON ({exc}): fix or re-download the checkpoint") from None


def has_second_expert(config: dict) -> bool:
    """WanPipeline runs ``transformer_2`` only when ``boundary_ratio`` is set (else it is never called)."""
    return config.get("boundary_ratio") is not None


def check_pipeline_config(model_path: str, config: dict) -> None:
    ratio = config.get("boundary_ratio")
    if ratio is not None and not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < 1):
        raise ModelError(f"{model_path}: boundary_ratio {ratio!r} in model_index.json is not a number in (0, 1)")


def check_supported(model_path: str, transformer, transformer_2=None) -> None:
    for name, model in (("transformer", transformer), ("transformer_2", transformer_2)):
        cfg = getattr(model, "config", None)
        if cfg is not None and (cfg.image_dim is not None or cfg.added_kv_proj_dim is not None):
            raise ModelError(f"{model_path}: image-conditioned Wan (I2V, {name}) is not supported: text-to-video "
                             f"checkpoints only")
    if transformer_2 is not None:
        keys = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "rope_max_seq_len")
        differ = [k for k in keys if transformer.config[k] != transformer_2.config[k]]
        if differ:
            raise ModelError(f"{model_path}: transformer and transformer_2 differ in {', '.join(differ)}; the two "
                             f"experts must share one architecture")


def parts(model, pipeline: dict | None = None) -> list[PartSpec]:
    """The parts; with ``pipeline["expand_timesteps"]`` (TI2V) timesteps and their embeddings per token."""
    cfg = model.config
    modules = model_code.part_modules(model, pipeline)
    per_token = modules["stem"].per_token
    d = cfg.num_attention_heads * cfg.attention_head_dim
    hidden, text = ["B", "F", "h", "w", d], ["B", "T", d]
    grid = ["B", "F", "h", "w"] if per_token else ["B"]  # where a timestep (embedding) applies
    temb, proj = IOSpec("temb", [*grid, d]), IOSpec("timestep_proj", [*grid, 6, d])
    stem = PartSpec("stem", modules["stem"],
                    inputs=[IOSpec("latents", ["B", cfg.in_channels, "F", "H", "W"]),
                            IOSpec("timestep", grid, low=0.0, high=1000.0, fixed_dtype=True),
                            IOSpec("encoder_hidden_states", ["B", "T", cfg.text_dim])],
                    outputs=[IOSpec("hidden", hidden), IOSpec("text", text), temb, proj])
    layers = [PartSpec(f"layer_{i:03d}", modules[f"layer_{i:03d}"],
                       inputs=[IOSpec("hidden", hidden), IOSpec("text", text), proj],
                       outputs=[IOSpec("hidden_out", hidden)])
              for i in range(cfg.num_layers)]
    head = PartSpec("head", modules["head"], inputs=[IOSpec("hidden", hidden), temb],
                    outputs=[IOSpec("noise_pred", ["B", cfg.out_channels, "F", "H", "W"])])
    return [stem, *layers, head]


class WanFamily(Family):
    """Wan 2.1 and Wan 2.2 A14B text-to-video in the registry."""

    name = "wan"
    pipeline_class = "WanPipeline"
    transformer_class = "WanTransformer3DModel"
    hub_example = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    presets = PRESETS

    def load(self, model_path: str):
        from diffusers import WanTransformer3DModel

        loaded = load_components(self, model_path, WanTransformer3DModel)
        config = pipeline_config(loaded.source)
        check_pipeline_config(loaded.source, config)
        if has_second_expert(config):
            local = Path(loaded.source).is_dir()
            if local and not (Path(loaded.source) / "transformer_2").is_dir():
                raise ModelError(f"{loaded.source} sets boundary_ratio (Wan 2.2's two experts) but has no "
                                 f"transformer_2/: download the full checkpoint (e.g. huggingface-cli download "
                                 f"Wan-AI/Wan2.2-T2V-A14B-Diffusers --local-dir DIR)")
            try:
                loaded.experts["transformer_2"] = WanTransformer3DModel.from_pretrained(
                    loaded.source, subfolder="transformer_2", local_files_only=local).eval()
            except Exception as exc:  # noqa: BLE001 - a loader failure becomes one actionable message
                raise ModelError(f"could not load transformer_2 of {loaded.source}: {exc}") from exc
        check_supported(loaded.source, loaded.transformer, loaded.experts.get("transformer_2"))
        return loaded

    def checkpoint_facts(self, source: str) -> dict:
        """Wan 2.2 A14B: the second expert runs the steps with ``t < boundary_ratio * num_train_timesteps``;
        TI2V: per-token timesteps."""
        config = pipeline_config(source)
        facts = {"boundary_ratio": float(config["boundary_ratio"])} if has_second_expert(config) else {}
        if config.get("expand_timesteps"):  # TI2V: one timestep per token (text-to-video: all equal)
            facts["expand_timesteps"] = True
        return facts

    def parts(self, model, pipeline: dict | None = None) -> list[PartSpec]:
        return parts(model, pipeline)

    def dims(self, model, vae_scale_factor: int, max_scale: int = 2, pipeline: dict | None = None) -> dict:
        """The pipeline's default video is the opt shape, up to ``max_scale`` times its size; CFG
        runs as two batch-1 passes (B opt 1). Every prompt is padded to the maximum text length."""
        p = pipeline or {}
        _, ph, pw = model.config.patch_size
        ratio = p.get("vae_scale_factor_temporal", 4)
        frames = (p.get("default_frames", 81) - 1) // ratio + 1
        h = p.get("default_height", 480) // vae_scale_factor // ph
        w = p.get("default_width", 832) // vae_scale_factor // pw
        t = p.get("max_text_length", MAX_TEXT_TOKENS)
        return {"B": {"min": 1, "opt": 1, "max": 2}, "F": {"min": 1, "opt": frames, "max": max(frames, 21)},
                "h": {"min": 2, "opt": h, "max": h * max_scale}, "w": {"min": 2, "opt": w, "max": w * max_scale},
                "T": {"min": 1, "opt": t, "max": t},
                "H": {"of": "h", "times": ph}, "W": {"of": "w", "times": pw}}

    def flow(self, model) -> dict:
        return {
            "state_init": {"hidden": "hidden"},
            "layer_inputs": {"hidden": "state:hidden", "text": "stem:text", "timestep_proj": "stem:timestep_proj"},
            "layer_state_out": {"hidden": "hidden_out"},
            "probes": ["hidden_out"],
            "head_inputs": {"hidden": "state:hidden", "temb": "stem:temb"},
            "head_output": "noise_pred",
        }

    def pipeline(self, model, vae_config: dict) -> dict:
        cfg = model.config
        return {
            "type": "wan",
            "latent_channels": cfg.in_channels,
            "patch_size": cfg.patch_size[1],
            "patch_size_t": cfg.patch_size[0],
            "vae_scale_factor": vae_config.get("scale_factor_spatial") or 8,
            "vae_scale_factor_temporal": vae_config.get("scale_factor_temporal") or 4,
            "latents_mean": list(vae_config["latents_mean"]),
            "latents_std": list(vae_config["latents_std"]),
            "max_text_length": MAX_TEXT_TOKENS,
            "cfg": "separate",  # WanPipeline: conditional, then unconditional pass, batch 1 each
            "default_frames": 81,
            "default_height": 480,
            "default_width": 832,
            "default_steps": 50,
            "default_guidance": 5.0,
            "default_negative_prompt": "",
            "fps": 16,
        }

    def compiled_components(self, loaded, pipeline: dict, dims_spec: dict) -> list:
        """The UMT5 encoder at the padded length, and AutoencoderKLWan's decoder for the default video's
        latent frames (on latents the runtime has de-normalised)."""
        from ..components import VaeDecoderPart, text_encoder, video_decoder

        ratio = pipeline["vae_scale_factor_temporal"]
        latent = (pipeline["default_frames"] - 1) // ratio + 1
        decoder = video_decoder(VaeDecoderPart(loaded.components["vae"]), pipeline["latent_channels"], latent,
                                1 + ratio * (latent - 1), dims_spec, pipeline["patch_size"],
                                pipeline["vae_scale_factor"])
        return [text_encoder(loaded.components["text_encoder"], pipeline["max_text_length"]), decoder]

    def foresight_defaults(self) -> dict:
        # The reference implementation's evaluation settings; to be re-picked per model by sweep.
        return {"warmup": 8, "recalculate": 2, "threshold": 0.5}
