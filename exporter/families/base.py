"""The family protocol: what one model family hands the exporter.

A family is a subclass of :class:`Family` in its own module of this package; subclassing
registers it under its ``name`` (the registry is derived, never a list kept by hand). It loads
a checkpoint, cuts the transformer into parts with symbolic I/O (the part modules themselves
are model code in :mod:`dit`, which the runtime's reference backend runs too), and states the
dims, the flow between parts and the pipeline facts the manifest records.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dit.errors import ModelError

COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")
# Saved into the engines folder too: the transformer's weights, which only the torch reference
# backend reads (the runtime never reads the source checkpoint).
SAVED_COMPONENTS = (*COMPONENTS, "transformer")


@dataclass
class IOSpec:
    """One input or output of a part. ``shape`` entries are ints or symbol names."""

    name: str
    shape: list
    dtype: str = "float32"
    low: float | None = None  # sample range for validation inputs; None -> standard normal
    high: float | None = None
    # Stays in ``dtype`` when the model runs in fp16/bf16 (e.g. diffusion timesteps, whose
    # sinusoidal embedding is computed in fp32: 999 is not representable in bf16).
    fixed_dtype: bool = False

    def to_dict(self) -> dict:
        d = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.fixed_dtype:
            d["fixed_dtype"] = True
        return d


@dataclass
class PartSpec:
    name: str
    module: object
    inputs: list[IOSpec] = field(default_factory=list)
    outputs: list[IOSpec] = field(default_factory=list)


def grid_dims(frames: tuple[int, int, int], grid_max: int, text_max: int, patch: tuple[int, int]) -> dict:
    """Export symbol ranges of a (B, F, h, w) token grid model: ``frames`` = (min, opt, max) latent
    frames, token grid 2..``grid_max`` (opt 4), caption 4..``text_max`` tokens, CFG batch 2 as
    the opt batch; H and W (latent size) derive from the grid times the patch."""
    return {"B": {"min": 1, "opt": 2, "max": 4}, "F": dict(zip(("min", "opt", "max"), frames)),
            "h": {"min": 2, "opt": 4, "max": grid_max}, "w": {"min": 2, "opt": 4, "max": grid_max},
            "T": {"min": 4, "opt": min(8, text_max), "max": text_max},
            "H": {"of": "h", "times": patch[0]}, "W": {"of": "w", "times": patch[1]}}


class FolderComponent:
    """A pipeline component kept as the files of its checkpoint subfolder: exporting copies the
    folder instead of loading and re-saving it. Files are copied, never hard-linked, unless
    ``link`` is set (``foresight-export --link-components``): a linked engines folder shares its
    files with the checkpoint, so editing one edits the other."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config = self.folder / "config.json"
        if not config.is_file():
            config = self.folder / "scheduler_config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}

    def save_pretrained(self, target, link: bool = False) -> None:
        def link_or_copy(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(self.folder, target, copy_function=link_or_copy if link else shutil.copy2)


def model_config_dict(model) -> dict:
    """A transformer's config as plain JSON values (a diffusers FrozenDict or a config dataclass)."""
    cfg = model.config
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(cfg, default=str))


@dataclass
class LoadedModel:
    transformer: object
    source: str
    components: dict  # name -> object with save_pretrained (text_encoder, tokenizer, vae, scheduler, transformer)
    experts: dict = field(default_factory=dict)  # the model's other transformers by component name (Wan 2.2)


class Family:
    """One model family. Subclasses set the class attributes and implement the methods that
    raise here; the others have defaults that fit most families."""

    name: str  # the --model value and the manifest's model.family
    pipeline_class: str  # the reference pipeline (the oracle), e.g. "LattePipeline"
    transformer_class: str
    hub_example: str  # named in messages about incomplete checkpoints
    presets: dict  # preset name -> shipped checkpoint folder
    registry: dict[str, type["Family"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Family.registry[cls.name] = cls

    # -- to implement
    def load(self, model_path: str) -> LoadedModel:
        raise NotImplementedError

    def parts(self, model, pipeline: dict | None = None) -> list[PartSpec]:
        """The parts of ``model``; ``pipeline``: the export's pipeline facts (options the model's
        pipeline sets, e.g. Wan 2.2 TI2V's per-token timesteps), None = the family's defaults."""
        raise NotImplementedError

    def dims(self, model, vae_scale_factor: int, max_scale: int = 2, pipeline: dict | None = None) -> dict:
        raise NotImplementedError

    def flow(self, model) -> dict:
        raise NotImplementedError

    def pipeline(self, model, vae_config: dict) -> dict:
        raise NotImplementedError

    def foresight_defaults(self) -> dict:
        raise NotImplementedError

    # -- defaults
    def vae_config(self, loaded: LoadedModel) -> dict:
        return dict(loaded.components["vae"].config)

    def video_frames(self, dims_spec: dict, pipeline: dict) -> dict:
        """Video frames per latent frame range F through the VAE's temporal compression r: 1 + r (F - 1)."""
        ratio = pipeline.get("vae_scale_factor_temporal", 1)
        return {k: 1 + ratio * (dims_spec["F"][k] - 1) for k in ("min", "opt", "max")}

    def write_extras(self, model, folder: Path) -> dict:
        """Pipeline files that come from the transformer (``{component name: file}``); none by default."""
        return {}

    def compiled_components(self, loaded: LoadedModel, pipeline: dict, dims_spec: dict) -> list:
        """``[(PartSpec, dims spec), ...]``: the text encoder and VAE decoder as parts that ``--backend aoti``
        compiles too, so a host without Python (the C++ runtime) goes from a prompt to frames. Their I/O:
        ``text_encoder(input_ids, attention_mask) -> embeddings`` as the Python runtime calls it, and
        ``vae_decoder(latents) -> images`` on the scaled latents it decodes. None by default."""
        return []

    def checkpoint_facts(self, source: str) -> dict:
        """Pipeline facts the checkpoint's own pipeline config sets (Wan 2.2's ``boundary_ratio``); none by default."""
        return {}


def resolve_model_path(family, model_path: str | None, preset: str | None) -> str:
    if (model_path is None) == (preset is None):
        raise ModelError("pass exactly one of --model-path DIR (a diffusers checkpoint) or --preset NAME")
    if preset is not None:
        if preset not in family.presets:
            raise ModelError(
                f"unknown preset {preset!r} for {family.name}: available presets are "
                f"{', '.join(sorted(family.presets))}"
            )
        return str(family.presets[preset])
    return model_path


def load_components(family, model_path: str, transformer_cls) -> LoadedModel:
    """Load a diffusers-format checkpoint: a local folder, or a hub id when the hub is reachable."""
    import diffusers
    import transformers

    path = Path(model_path).expanduser()
    looks_local = path.exists() or model_path.startswith((".", "/", "~"))
    if looks_local:
        model_path = str(path)
    if looks_local:
        if not path.is_dir():
            raise ModelError(f"checkpoint folder {model_path} does not exist: pass a diffusers-format folder to --model-path")
        index = path / "model_index.json"
        missing = [c for c in ("transformer", *COMPONENTS) if not (path / c).is_dir()]
        if not index.is_file() or missing:
            what = ", ".join(([] if index.is_file() else ["model_index.json"]) + [c + "/" for c in missing])
            raise ModelError(
                f"{model_path} is not a complete diffusers {family.pipeline_class} checkpoint: missing {what}. "
                f"Download the full pipeline folder (e.g. huggingface-cli download {family.hub_example} --local-dir DIR)"
            )
    try:
        if looks_local:
            model_index = json.loads((path / "model_index.json").read_text())
        else:
            from huggingface_hub import hf_hub_download

            model_index = json.loads(Path(hf_hub_download(model_path, "model_index.json")).read_text())
        transformer = transformer_cls.from_pretrained(model_path, subfolder="transformer").eval()
        components = {"transformer": transformer}
        for name in COMPONENTS:
            library, cls_name = model_index[name]
            module = diffusers if library == "diffusers" else transformers
            cls = getattr(module, cls_name)
            components[name] = cls.from_pretrained(model_path, subfolder=name)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes one actionable message
        raise ModelError(f"could not load {family.pipeline_class} checkpoint {model_path!r}: {exc}") from exc
    return LoadedModel(transformer=transformer, source=str(path.resolve()) if looks_local else model_path,
                       components=components)
