"""Build one TensorRT engine per exported ONNX file (``foresight-export --backend tensorrt``).

Written to the TensorRT 10.12+/11 builder API:
strongly typed networks (precision comes from the ONNX file, no precision flags), one
optimisation profile per engine from the manifest's dims ranges (CFG batch included), one
timing cache shared by every layer and saved next to the engines, an optional workspace
limit. An engine is rebuilt only when its ONNX hash, the TensorRT version, the GPU or the
profile differ from what the manifest recorded.

Nothing here runs on machines without tensorrt and a GPU; the pure parts (profiles, the
rebuild decision, the manifest section) are tested everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import BackendError
from runtime.manifest import MANIFEST_NAME, Dims, Part, sha256_file
from runtime.trt import device_identity, require_tensorrt

TIMING_CACHE = "timing.cache"


def profile_shapes(part: Part, dims: Dims) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every input of a part, from the manifest's symbolic shapes."""
    at = {w: dims.at(w) for w in ("min", "opt", "max")}
    return {io.name: tuple(io.shape_at(at[w]) for w in ("min", "opt", "max")) for io in part.inputs}


def needs_rebuild(recorded: dict | None, onnx_sha256: str, trt_version: str, device: dict, profile: dict,
                  engine_path: Path) -> str | None:
    """Why an engine must be (re)built, or None when the recorded one still fits."""
    if not recorded or not engine_path.is_file():
        return "no engine yet"
    checks = (("onnx_sha256", onnx_sha256), ("tensorrt_version", trt_version), ("device", device),
              ("profile", json.loads(json.dumps(profile))))
    for key, want in checks:
        if recorded.get(key) != want:
            return f"{key} changed"
    if sha256_file(engine_path) != recorded.get("sha256"):
        return "engine file changed on disk"
    return None


def _build_one(trt, logger, onnx_path: Path, shapes: dict, timing_cache, workspace: int | None):
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if workspace:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"TensorRT failed to build an engine for {onnx_path.name}; see the log above")
    return plan, config.get_timing_cache()


def build_engines(folder: Path, workspace: int | None = None, progress=True) -> dict:
    """Build (or reuse) an engine per part of ``folder``; rewrites the manifest's ``tensorrt`` section."""
    from tqdm.auto import tqdm

    from runtime.manifest import load_manifest

    manifest = load_manifest(folder)
    if manifest.experts:
        raise BackendError(f"{folder} has {manifest.num_experts} experts (Wan 2.2 A14B): TensorRT engines for "
                       f"two-expert folders are not built yet; use --backend aoti (compiled) or onnxruntime")
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    device = device_identity()
    old = dict(manifest.tensorrt or {})
    cache_path = folder / TIMING_CACHE
    seed_builder = trt.Builder(logger)
    seed_config = seed_builder.create_builder_config()
    timing_cache = seed_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    engines = {}
    for part in tqdm(manifest.all_parts, desc="tensorrt", unit="engine", disable=not progress):
        onnx_path = manifest.path(part.file)
        engine_path = onnx_path.with_suffix(".plan")
        shapes = profile_shapes(part, manifest.dims)
        profile = {k: [list(s) for s in v] for k, v in shapes.items()}
        recorded = old.get("engines", {}).get(part.name)
        onnx_sha256 = manifest.files[part.file].sha256
        reason = needs_rebuild(recorded, onnx_sha256, trt.__version__, device, profile, engine_path)
        if reason is None:
            engines[part.name] = recorded
            continue
        plan, timing_cache = _build_one(trt, logger, onnx_path, shapes, timing_cache, workspace)
        engine_path.write_bytes(bytes(plan))
        engines[part.name] = {"file": engine_path.name, "sha256": sha256_file(engine_path),
                              "onnx_sha256": onnx_sha256, "tensorrt_version": trt.__version__,
                              "device": device, "profile": profile, "rebuilt_because": reason}
    cache_path.write_bytes(bytes(timing_cache.serialize()))
    section = {"tensorrt_version": trt.__version__, "device": device, "timing_cache": TIMING_CACHE,
               "workspace": workspace, "engines": engines}
    write_manifest_section(folder, "tensorrt", section, [e["file"] for e in engines.values()] + [TIMING_CACHE])
    return section


def write_manifest_section(folder: Path, key: str, value: dict, files: list[str] = ()) -> None:
    """Replace one top-level manifest entry atomically (temp file + rename), listing ``files``
    (paths relative to the folder that the section names) with their hashes."""
    from runtime.outputs import atomic_write

    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data[key] = value
    for rel in files:
        data["files"][rel] = {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def validate_engines(folder: Path, seed: int = 0) -> list[dict]:
    """Compare every engine with ONNX Runtime (CPU) on the same random inputs at the profile's
    opt shape, with Polygraphy's runners and comparator; print and return a per-part table."""
    import numpy as np

    require_tensorrt()
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from runtime.manifest import load_manifest

    manifest = load_manifest(folder)
    section = manifest.tensorrt or {}
    dims = manifest.dims.at("opt")
    rng = np.random.default_rng(seed)
    rows = []
    for part in manifest.all_parts:
        engine_file = manifest.path(section["engines"][part.name]["file"])
        feed = {io.name: rng.standard_normal(io.shape_at(dims)).astype(io.dtype) for io in part.inputs}
        runners = [TrtRunner(EngineFromBytes(engine_file.read_bytes())),
                   OnnxrtRunner(SessionFromOnnx(str(manifest.path(part.file)), providers=["cpu"]))]
        results = Comparator.run(runners, data_loader=[feed])
        passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(rtol=1e-2, atol=1e-2)))
        (_, trt_out), (_, ort_out) = results.items()
        errors = {}
        for io in part.outputs:
            a, b = np.asarray(trt_out[0][io.name], dtype=np.float64), np.asarray(ort_out[0][io.name], dtype=np.float64)
            errors[io.name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        rows.append({"part": part.name, "max_rel_error": errors, "passed": passed})
        print(f"  {part.name:<10} " + "  ".join(f"{k} {v:.2e}" for k, v in errors.items())
              + ("" if passed else "  FAILED"))
    return rows
