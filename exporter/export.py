"""Export a model to a folder of per-part ONNX files plus a manifest.

Build and run meet only through files on disk: this module writes
``<out>/{stem,layer_NNN,head}.onnx``, the text encoder / tokenizer / VAE / scheduler and the
transformer's weights (for the torch reference backend) in diffusers layout, and
``manifest.json`` listing every file with its sha256 (docs/engines-format.md). Everything is
written to a temporary sibling folder and renamed into place at the end, so an interrupted
export never leaves a manifest that points at missing files.

What the export may replace: only an engines folder (its manifest says so) or an empty
folder, and never the checkpoint it reads, a folder that holds it, or the current folder.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ForesightError
from runtime.manifest import FORMAT, MANIFEST_NAME, MIN_SCHEMA_VERSION, SCHEMA_VERSION, file_table
from runtime.outputs import clean_stale, staged_dir

from .families import get_family
from .inputs import cast_specs, dynamic_shapes, make_inputs, max_rel_error, validation_dims
from .families.base import COMPONENTS, SAVED_COMPONENTS, model_config_dict, resolve_model_path

FP32_TOLERANCE = 1e-4
# Max relative error of a part's ONNX Runtime output vs eager PyTorch in the same dtype. fp16:
# the tiny Latte's layers measured 4.8e-4..1.2e-3 (fp16 rounding of long reductions differs).
# bfloat16 (8 mantissa bits): the tiny Latte's parts measured 6e-3..1.8e-2 against torch in bf16.
TOLERANCES = {"float32": FP32_TOLERANCE, "float16": 1e-2, "bfloat16": 4e-2}
DTYPES = tuple(TOLERANCES)
# Who runs the ONNX files for validation. ONNX Runtime's CPU provider has no bf16 kernels (Conv,
# Expand: NOT_IMPLEMENTED), so bf16 files run on ONNX's own reference implementation (numpy with
# ml_dtypes' bfloat16: exact to the spec, slow on large models).
RUNNERS = {"float32": "onnxruntime CPU", "float16": "onnxruntime CPU", "bfloat16": "onnx.reference"}
OPSET = 23


class ExportError(ForesightError):
    """Export or validation failed."""


@dataclass
class ExportOptions:
    model: str = "latte"
    out: Path = Path("engines/latte-tiny")
    model_path: str | None = None
    preset: str | None = None
    overwrite: bool = False
    tolerance: float | None = None  # None: TOLERANCES[dtype]
    dtype: str = "float32"  # weights and activations of every part; timesteps etc. stay fp32 (fixed_dtype)
    max_scale: int = 2
    seed: int = 0
    link_components: bool = False  # hard-link component files from the checkpoint instead of copying
    backend: str = "onnxruntime"  # "aoti" also compiles every part with AOTInductor (exporter/aoti_build.py)
    device: str = "cpu"  # the device AOTInductor packages are compiled for


def export_part(part, dims_spec: dict, path: Path, generator) -> None:
    import torch

    example = make_inputs(part.inputs, validation_dims(dims_spec)[0], generator)
    sink = io.StringIO()
    # The exporter warns once per export about torchvision ops it cannot register; noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    from .attention import packed_heads

    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), torch.no_grad(), packed_heads(part.module):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            part.module, example, str(path), dynamo=True, opset_version=OPSET,
            input_names=[s.name for s in part.inputs], output_names=[s.name for s in part.outputs],
            dynamic_shapes=dynamic_shapes(part.inputs, dims_spec), external_data=False, verbose=False,
        )
    normalize_onnx(path, part)


def normalize_onnx(path: Path, part) -> None:
    """Check the graph's dims really are dynamic, name them as the manifest does, and drop
    exporter metadata (stack traces with local paths, constraint lists in hash-seed order),
    so the same weights always give the same file and sha256."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for specs, values in ((part.inputs, model.graph.input), (part.outputs, model.graph.output)):
        for spec, value in zip(specs, values):
            for want, got in zip(spec.shape, value.type.tensor_type.shape.dim):
                if isinstance(want, str):
                    if got.HasField("dim_value"):
                        raise ExportError(
                            f"{path.name}: {spec.name} dimension {want} was exported as the fixed size "
                            f"{got.dim_value}; the part's forward must not specialise on it"
                        )
                    got.dim_param = want
    del model.metadata_props[:]
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def onnx_runner(path: Path, specs):
    """``run(feeds) -> outputs`` for one ONNX file: ONNX Runtime on CPU, or for files with bf16 tensors
    (which it has no CPU kernels for) ONNX's reference implementation."""
    if not any(s.dtype == "bfloat16" for s in specs):
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda feeds: sess.run(None, feeds)
    import ml_dtypes
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(str(path))
    bf16 = {s.name for s in specs if s.dtype == "bfloat16"}
    return lambda feeds: ref.run(None, {k: v.astype(ml_dtypes.bfloat16) if k in bf16 else v for k, v in feeds.items()})


def as_numpy(t):
    """A torch tensor as numpy; bf16 (which numpy lacks) via float32, which holds every bf16 value exactly."""
    import torch

    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def validate_part(part, path: Path, dims_spec: dict, generator) -> list[dict]:
    """Run the ONNX file (:func:`onnx_runner`) and eager PyTorch on random inputs at two shapes; max
    relative error per output."""
    import torch

    run = onnx_runner(path, part.inputs)
    results = []
    for dims in validation_dims(dims_spec):
        inputs = make_inputs(part.inputs, dims, generator)
        with torch.no_grad():
            ref = part.module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = run({s.name: as_numpy(t) for s, t in zip(part.inputs, inputs)})
        errors = {}
        for spec, r, g in zip(part.outputs, ref, got):
            want_shape = tuple(d if isinstance(d, int) else dims[d] for d in spec.shape)
            if g.shape != want_shape or tuple(r.shape) != want_shape:
                raise ExportError(f"{path.name}: output {spec.name} has shape {g.shape}, expected {want_shape}")
            errors[spec.name] = max_rel_error(g, r)
        results.append({"dims": {k: v for k, v in dims.items()}, "max_rel_error": errors})
    return results


DEFAULTS_FILE = "defaults.json"


def checkpoint_defaults(family, source: str) -> tuple[dict, dict]:
    """(Foresight defaults, pipeline default overrides) for a checkpoint.

    A checkpoint may ship ``defaults.json`` (written by ``tools/train.py``) with the
    Foresight parameters picked by a sweep for that model (``"foresight"``) and its own
    ``"guidance_scale"`` / ``"num_inference_steps"`` / ``"num_frames"`` / ``"height"`` / ``"width"``;
    otherwise the family's apply."""
    from foresight import make_config

    path = Path(source) / DEFAULTS_FILE
    if not path.is_file():
        return family.foresight_defaults(), {}
    try:
        values = json.loads(path.read_text())
        foresight = family.foresight_defaults()
        if "foresight" in values:
            f = values["foresight"]
            config = make_config("foresight", **{k: f[k] for k in ("warmup", "recalculate", "threshold")})
            foresight = {k: v for k, v in config.to_dict().items() if k != "policy"}
        pipeline = {}
        if "guidance_scale" in values:
            pipeline["default_guidance"] = float(values["guidance_scale"])
        if "guidance_scale_2" in values:  # the second expert's (Wan 2.2)
            pipeline["default_guidance_2"] = float(values["guidance_scale_2"])
        if "num_inference_steps" in values:
            pipeline["default_steps"] = int(values["num_inference_steps"])
        if "max_sequence_length" in values:  # the text length the checkpoint's pipeline pads prompts to
            pipeline["max_text_length"] = int(values["max_sequence_length"])
        for key, name in (("num_frames", "default_frames"), ("height", "default_height"), ("width", "default_width")):
            if key in values:
                pipeline[name] = int(values[key])
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{path} is not a valid defaults file ({exc}): fix or delete it") from exc
    return foresight, pipeline


def pipeline_facts(family, model, vae_config: dict, source: str) -> tuple[dict, dict, dict]:
    """(Foresight defaults, pipeline facts, the checkpoint's overrides): the family's facts with the
    checkpoint's defaults.json on top."""
    foresight, overrides = checkpoint_defaults(family, source)
    pipeline = family.pipeline(model, vae_config)
    pipeline.update(family.checkpoint_facts(source))
    pipeline.update(overrides)
    return foresight, pipeline, overrides


def save_components(components: dict, out: Path, link: bool = False, experts: dict | None = None) -> None:
    """Every component into ``out/<name>`` (the transformers in the dtype they were loaded in)."""
    from .families.base import FolderComponent

    for name, comp in [(n, components[n]) for n in SAVED_COMPONENTS] + list((experts or {}).items()):
        target = out / name
        if isinstance(comp, FolderComponent):
            comp.save_pretrained(target, link=link)
        else:  # diffusers / transformers models, tokenizers and schedulers
            comp.save_pretrained(target)


def export_parts(parts, dims_spec: dict, folder: Path, prefix: str, tolerance: float, generator, bar) -> list[dict]:
    """Export and validate every part to ``folder/<prefix><part>.onnx``; their manifest entries."""
    entries = []
    for part in parts:
        bar.set_postfix_str(prefix + part.name)
        file = folder / f"{prefix}{part.name}.onnx"
        file.parent.mkdir(parents=True, exist_ok=True)
        export_part(part, dims_spec, file, generator)
        validation = validate_part(part, file, dims_spec, generator)
        worst = max(e for v in validation for e in v["max_rel_error"].values())
        bar.write(f"  {prefix + part.name:<18} {file.stat().st_size / 1e6:7.2f} MB  max rel err {worst:.2e}")
        if worst > tolerance:
            raise ExportError(
                f"{prefix + part.name}: ONNX Runtime differs from PyTorch by a relative {worst:.2e} "
                f"(limit {tolerance:.0e}); see the per-output errors: {validation}"
            )
        entries.append(part_entry(part, prefix + file.name, validation))
        bar.update(1)
    return entries


def expert_prefix(index: int) -> str:
    """Where expert ``index``'s part files go (expert 0's are at the top of the folder)."""
    return f"expert_{index}/" if index else ""


def part_entry(part, file: str, validation: list[dict]) -> dict:
    return {
        "name": part.name,
        "file": file,
        "inputs": [s.to_dict() for s in part.inputs],
        "outputs": [s.to_dict() for s in part.outputs],
        "validation": validation,
    }


def carry_engines(old: Path, new: Path, manifest: dict) -> None:
    """Re-exporting over a folder with TensorRT engines keeps them and their manifest section,
    so ``foresight-export --backend tensorrt`` rebuilds only the engines whose ONNX hash,
    TensorRT version, GPU or profile changed (it compares against what is carried here)."""
    try:
        section = json.loads((old / MANIFEST_NAME).read_text()).get("tensorrt")
    except (OSError, ValueError):
        return
    if not section:
        return
    for entry in section.get("engines", {}).values():
        if (old / entry["file"]).is_file():
            shutil.copy2(old / entry["file"], new / entry["file"])
    cache = section.get("timing_cache")
    if cache and (old / cache).is_file():
        shutil.copy2(old / cache, new / cache)
    manifest["tensorrt"] = section


def describe(family, model, vae_config: dict, dims_spec: dict, entries: list[dict], name: str, source: str,
             preset: str | None = None) -> dict:
    """The manifest for a split model: everything but the files' own entries is derived here,
    so an in-memory engines description (``tools/gpu_check.py``) matches an exported one."""
    import torch

    from runtime import __version__

    foresight, pipeline, overrides = pipeline_facts(family, model, vae_config, source)
    px = pipeline["vae_scale_factor"] * pipeline["patch_size"]
    frames = family.video_frames(dims_spec, pipeline)
    shapes = {
        "frames": {"min": frames["min"], "max": frames["max"], "default": frames["opt"]},
        "height": {"min": dims_spec["h"]["min"] * px, "max": dims_spec["h"]["max"] * px,
                   "multiple_of": px, "default": dims_spec["h"]["opt"] * px},
        "width": {"min": dims_spec["w"]["min"] * px, "max": dims_spec["w"]["max"] * px,
                  "multiple_of": px, "default": dims_spec["w"]["opt"] * px},
        "batch": {"min": dims_spec["B"]["min"], "max": dims_spec["B"]["max"]},
        "text_tokens": {"max": dims_spec["T"]["max"]},
    }
    for key, axis in (("default_frames", "frames"), ("default_height", "height"), ("default_width", "width")):
        if key in overrides:  # the checkpoint's defaults.json decides the default video shape
            spec, value = shapes[axis], overrides[key]
            if not spec["min"] <= value <= spec["max"] or value % spec.get("multiple_of", 1):
                raise ExportError(f"{source}/{DEFAULTS_FILE}: {axis} {value} is not one the engines accept "
                                  f"({spec['min']}..{spec['max']}, multiple of {spec.get('multiple_of', 1)})")
            spec["default"] = value
    return {
        "schema_version": MIN_SCHEMA_VERSION,  # version 3 only for folders with experts (docs §1)
        "format": FORMAT,
        "name": name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"foresight-dit": __version__, "torch": torch.__version__, "opset": OPSET},
        "model": {
            "family": family.name,
            "transformer_class": family.transformer_class,
            "num_layers": len(entries) - 2,
            "config": model_config_dict(model),
            "source": {"checkpoint": source, "preset": preset},
        },
        "artifact": "onnx",
        "dtype": "float32",
        "dims": dims_spec,
        "shapes": shapes,
        "parts": {"stem": entries[0], "layers": entries[1:-1], "head": entries[-1]},
        "flow": family.flow(model),
        "pipeline": pipeline,
        "components": {c: c for c in COMPONENTS},
        "files": {},  # filled by the export once every file is written
        "foresight_defaults": foresight,
    }


def is_engines_folder(path: Path) -> bool:
    """A folder this tool wrote: its manifest names the engines format (any schema version)."""
    try:
        return json.loads((path / MANIFEST_NAME).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_out(out: Path, model_path: str, overwrite: bool) -> Path:
    """Refuse every --out the export could destroy user data with; returns it resolved."""
    out = Path(out).expanduser().resolve()
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise ExportError(f"--out {out} is the current folder or holds it; pass a new folder, "
                          f"e.g. --out engines/<name>")
    source = Path(model_path).expanduser()
    if source.exists():
        source = source.resolve()
        if out == source or source in out.parents or out in source.parents:
            raise ExportError(f"--out {out} is, is inside, or holds the checkpoint {source}: exporting there would "
                              f"destroy it; choose an --out outside it")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder: choose another --out")
        if not overwrite:
            raise ExportError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
        if any(out.iterdir()) and not is_engines_folder(out):
            raise ExportError(f"{out} is not an engines folder (no {MANIFEST_NAME} of format {FORMAT}): "
                              f"--overwrite replaces only engines folders; choose another --out")
    if not out.parent.is_dir():
        raise ExportError(f"the parent folder of --out {out} does not exist: create it first")
    return out


def make_readable(folder: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as any tool's outputs: savers and mkdtemp
    make some 0600/0700, which another user of a shared engines folder could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export(opts: ExportOptions, progress=True) -> Path:
    """Export ``opts.model`` to ``opts.out``; returns the folder. Prints progress per part."""
    import torch
    from tqdm.auto import tqdm

    if opts.dtype not in DTYPES:
        raise ExportError(f"--dtype {opts.dtype}: this version exports {', '.join(DTYPES)}")
    tolerance = TOLERANCES[opts.dtype] if opts.tolerance is None else opts.tolerance
    if opts.backend == "aoti":
        from .aoti_build import require_compiler

        require_compiler(opts.device)  # before minutes of export
    family = get_family(opts.model)
    model_path = resolve_model_path(family, opts.model_path, opts.preset)
    out = check_out(Path(opts.out), model_path, opts.overwrite)
    clean_stale(out)  # temporaries of exports that were killed

    t0 = time.perf_counter()
    loaded = family.load(model_path)
    with staged_dir(out) as tmp:
        # before the dtype cast below
        save_components(loaded.components, tmp, link=opts.link_components, experts=loaded.experts)
        dtype = getattr(torch, opts.dtype)
        model = loaded.transformer.to(dtype).eval()
        experts = {name: m.to(dtype).eval() for name, m in loaded.experts.items()}
        vae_config = family.vae_config(loaded)
        _, pipeline, _ = pipeline_facts(family, model, vae_config, loaded.source)
        parts = family.parts(model, pipeline)
        expert_parts = [family.parts(m, pipeline) for m in experts.values()]
        for p in (parts, *expert_parts):
            cast_specs(p, opts.dtype)
        dims_spec = family.dims(model, pipeline["vae_scale_factor"], opts.max_scale, pipeline=pipeline)
        generator = torch.Generator().manual_seed(opts.seed)
        bar = tqdm(total=len(parts) * (1 + len(experts)), desc="export", unit="part", disable=not progress)
        entries = export_parts(parts, dims_spec, tmp, "", tolerance, generator, bar)
        expert_entries = [export_parts(p, dims_spec, tmp, expert_prefix(k), tolerance, generator, bar)
                          for k, p in enumerate(expert_parts, 1)]
        bar.close()
        manifest = describe(family, model, vae_config, dims_spec, entries, name=out.name,
                            source=loaded.source, preset=opts.preset)
        manifest["pipeline"]["max_steps"] = max_steps(loaded.components["scheduler"])
        manifest["components"]["transformer"] = "transformer"
        manifest["components"].update(family.write_extras(model, tmp))  # e.g. Open-Sora's null caption
        manifest["dtype"] = opts.dtype
        for spec in manifest["flow"].get("pipeline_inputs", []):  # computed by the runtime, bound in this dtype
            spec["dtype"] = opts.dtype
        manifest["validation"] = {"tolerance": tolerance, "reference": f"torch eager {opts.dtype}",
                                  "runner": RUNNERS[opts.dtype]}
        if experts:
            manifest["schema_version"] = SCHEMA_VERSION
            manifest["experts"] = []
            for name, rows in zip(experts, expert_entries):
                manifest["components"][name] = name
                manifest["experts"].append({"name": name, "component": name,
                                            "files": {e["name"]: e["file"] for e in rows},
                                            "validation": {e["name"]: e["validation"] for e in rows}})
        carry_engines(out, tmp, manifest)
        if opts.backend == "aoti":
            from . import aoti_build

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                manifest["aoti"] = aoti_build.build(tmp, parts, dims_spec, opts.device, opts.dtype,
                                                    previous=out if out.is_dir() else None, generator=generator,
                                                    progress=progress)
                for k, (entry, p) in enumerate(zip(manifest.get("experts", []), expert_parts), 1):
                    section = aoti_build.build(tmp, p, dims_spec, opts.device, opts.dtype,
                                               previous=out if out.is_dir() else None, generator=generator,
                                               progress=progress, prefix=expert_prefix(k),
                                               shared=manifest["aoti"]["programs"])
                    manifest["aoti"]["programs"].update(section["programs"])
                    entry["aoti"] = section["parts"]
                components = family.compiled_components(loaded, pipeline, dims_spec)
                if components:
                    manifest["aoti"]["components"] = aoti_build.build_components(
                        tmp, components, opts.device, manifest["aoti"]["programs"],
                        previous=out if out.is_dir() else None, generator=generator, progress=progress)
        manifest["files"] = file_table(tmp)
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        make_readable(tmp)
    return out


def max_steps(scheduler) -> int:
    """The most denoising steps the scheduler can take (its training timesteps)."""
    config = scheduler.config
    return int(config.get("num_train_timesteps", config.get("num_timesteps", 1000)))
