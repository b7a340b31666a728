"""The engines folder's manifest: validated against its JSON Schema, then parsed into typed objects.

The manifest is the only thing the runtime knows about how a model was exported: which files
exist and their hashes, each part's inputs/outputs with symbolic shapes, what flows from part
to part, which layer outputs are Foresight probes, and the pipeline facts (scheduler, text
encoder, VAE) needed to turn a prompt into a video. ``docs/engines-format.md`` documents the
format; ``runtime/schema/manifest.schema.json`` is its machine-readable form, shipped with the
package for other readers (a C++ host).

:func:`load_manifest` checks, before anything is allocated or any engine is loaded:

1. the JSON Schema (types, bounded dims and sizes, relative paths without ``..``);
2. every path in the manifest resolves inside the folder (symlinks included), every file the
   runtime reads is listed with its sha256 and size, and a component folder holds no file
   that is not listed (a loader could pick it up);
3. the cross-references a schema cannot state: dims derive from declared dims, the layer list
   matches the model config, every flow source and probe names a tensor that exists.

Callers use the typed objects (:class:`Manifest`, :class:`Part`, :class:`Flow`, :class:`Dims`)
and never the raw dict.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .errors import ManifestError, ShapeError

SCHEMA_VERSION = 3  # the newest version this runtime reads: 2 plus ``experts``
MIN_SCHEMA_VERSION = 2  # exporters write 2 for folders without experts, so version-2 readers keep reading them
FORMAT = "foresight-engines"
MANIFEST_NAME = "manifest.json"
SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "manifest.schema.json"
MAX_MANIFEST_BYTES = 16 << 20
# The model-config key that holds the number of layers, per family (the layer list must match it).
LAYER_COUNT_KEYS = {"latte": "num_layers", "cogvideox": "num_layers", "opensora": "depth", "wan": "num_layers"}
FREE_DIMS = ("B", "F", "h", "w", "T")
PIPELINE_COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")  # required; not an expert's weights  # batch, latent frames, token grid rows/cols, text tokens


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def schema() -> dict:
    """The manifest's JSON Schema (draft 2020-12)."""
    return json.loads(SCHEMA_FILE.read_text())


# ---------------------------------------------------------------------------- typed objects
@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a part. ``shape`` entries are ints or dim symbols."""

    name: str
    shape: tuple
    dtype: str
    fixed_dtype: bool = False  # stays in ``dtype`` when the model runs in fp16/bf16 (timesteps)

    @classmethod
    def parse(cls, d: Mapping) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"], bool(d.get("fixed_dtype", False)))

    def shape_at(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class Part:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def parse(cls, d: Mapping) -> "Part":
        return cls(d["name"], d["file"], tuple(map(TensorSpec.parse, d["inputs"])),
                   tuple(map(TensorSpec.parse, d["outputs"])))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Dims:
    """The export's dim symbols: free ones with their built range, and derived ones
    (``H = h * patch``). The one place that derives the latter from the former."""

    ranges: Mapping[str, DimRange]
    derived: Mapping[str, tuple[str, int]]  # symbol -> (base symbol, factor)

    @classmethod
    def parse(cls, spec: Mapping) -> "Dims":
        ranges = {s: DimRange(v["min"], v["opt"], v["max"]) for s, v in spec.items() if "of" not in v}
        derived = {s: (v["of"], v["times"]) for s, v in spec.items() if "of" in v}
        for sym, r in ranges.items():
            if not r.min <= r.opt <= r.max:
                raise ValueError(f"dims.{sym}: min <= opt <= max does not hold ({r.min}, {r.opt}, {r.max})")
        for sym, (base, _) in derived.items():
            if base not in ranges:
                raise ValueError(f"dims.{sym} derives from {base!r}, which is not a declared dim")
        return cls(MappingProxyType(ranges), MappingProxyType(derived))

    @property
    def symbols(self) -> tuple[str, ...]:
        return (*self.ranges, *self.derived)

    def derive(self, values: Mapping[str, int]) -> dict[str, int]:
        """Base values plus every derived symbol (no range check: the exporter's validation shapes)."""
        out = {s: int(values[s]) for s in self.ranges}
        out.update({s: out[base] * times for s, (base, times) in self.derived.items()})
        return out

    def at(self, which: str) -> dict[str, int]:
        """Every symbol at the built ``min``, ``opt`` or ``max``."""
        return self.derive({s: getattr(r, which) for s, r in self.ranges.items()})

    def bind(self, **values: int) -> dict[str, int]:
        """Check base symbol values against the built ranges and add the derived ones."""
        for sym, r in self.ranges.items():
            if sym not in values:
                raise ShapeError(f"no value for dimension {sym!r}")
            v = values[sym]
            if not r.min <= v <= r.max:
                raise ShapeError(f"dimension {sym}={v} is outside the exported range [{r.min}, {r.max}]")
        return self.derive(values)


@dataclass(frozen=True)
class Source:
    """Where a layer or head input comes from: ``state:<name>`` (the tensor carried from layer to
    layer), ``stem:<output>``, ``input:<stem input>`` or ``pipeline:<pipeline input>``."""

    kind: str
    name: str

    @classmethod
    def parse(cls, text: str) -> "Source":
        kind, name = text.split(":", 1)
        return cls(kind, name)


@dataclass(frozen=True)
class Flow:
    state_init: Mapping[str, str]  # state name -> stem output it starts as
    layer_inputs: Mapping[str, Source]  # layer input -> source
    layer_state_out: Mapping[str, str]  # state name -> layer output it continues as
    probes: tuple[str, ...]  # layer outputs whose change Foresight measures; the last feeds reuse
    head_inputs: Mapping[str, Source]
    head_output: str
    pipeline_inputs: tuple[TensorSpec, ...] = ()  # tensors the pipeline computes once per shape

    @classmethod
    def parse(cls, d: Mapping) -> "Flow":
        return cls(
            MappingProxyType(dict(d["state_init"])),
            MappingProxyType({k: Source.parse(v) for k, v in d["layer_inputs"].items()}),
            MappingProxyType(dict(d["layer_state_out"])),
            tuple(d["probes"]),
            MappingProxyType({k: Source.parse(v) for k, v in d["head_inputs"].items()}),
            d["head_output"],
            tuple(map(TensorSpec.parse, d.get("pipeline_inputs", []))),
        )


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Expert:
    """One of a model's other transformers (Wan 2.2's low-noise expert): the same parts as
    ``Manifest.parts``, in other files. Expert 0 is the manifest's own parts."""

    name: str
    component: str  # its weights folder in ``components`` (torch backend)
    files: Mapping[str, str]  # part name -> file
    aoti: Mapping | None = None  # part name -> {program, weights, validation} when the folder has packages

    @classmethod
    def parse(cls, d: Mapping) -> "Expert":
        return cls(d["name"], d["component"], MappingProxyType(dict(d["files"])),
                   MappingProxyType(dict(d["aoti"])) if d.get("aoti") is not None else None)


@dataclass(frozen=True)
class Manifest:
    """A loaded, validated engines folder description. ``root`` is the folder (resolved)."""

    root: Path
    name: str
    family: str
    model_config: Mapping
    dtype: str
    dims: Dims
    shapes: Mapping
    stem: Part
    layers: tuple[Part, ...]
    head: Part
    flow: Flow
    pipeline: Mapping  # pipeline facts (docs/engines-format.md lists them per pipeline type)
    components: Mapping[str, str]  # component -> relative path (folder or file)
    files: Mapping[str, FileEntry]  # every file the runtime may read, relative path -> hash and size
    foresight_defaults: Mapping
    source: Mapping = field(default_factory=dict)  # the checkpoint it was exported from (for tools; never read)
    tensorrt: Mapping | None = None
    aoti: Mapping | None = None  # AOTInductor packages (runtime/aoti.py): identity, programs, per-part weights
    experts: tuple[Expert, ...] = ()  # the model's other transformers (expert 0 is stem/layers/head)
    raw: Mapping = field(default_factory=dict, repr=False)  # for writers that update one section

    @property
    def all_parts(self) -> tuple[Part, ...]:
        return (self.stem, *self.layers, self.head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def probes(self) -> tuple[str, ...]:
        return self.flow.probes

    def part(self, name: str) -> Part:
        return next(p for p in self.all_parts if p.name == name)

    @property
    def num_experts(self) -> int:
        return 1 + len(self.experts)

    def expert(self, index: int) -> "Manifest":
        """The manifest as expert ``index`` sees it: its part files, weights component and AOTInductor
        weights in place of expert 0's, so any backend loads it unchanged. Expert 0 is the manifest."""
        if index == 0:
            return self
        e = self.experts[index - 1]
        parts = {p.name: dataclasses.replace(p, file=e.files[p.name]) for p in self.all_parts}
        return dataclasses.replace(
            self, stem=parts["stem"], layers=tuple(parts[p.name] for p in self.layers), head=parts["head"],
            components=MappingProxyType({**self.components, "transformer": self.components[e.component]}),
            aoti=None if self.aoti is None else {**self.aoti, "parts": dict(e.aoti)},
            tensorrt=None, experts=())

    def path(self, relative: str) -> Path:
        """A listed path inside the folder (checked at load)."""
        return self.root / relative

    def component(self, name: str) -> Path:
        if name not in self.components:
            raise ManifestError(f"{self.root} has no {name} component; re-export the engines folder")
        return self.root / self.components[name]


# ---------------------------------------------------------------------------- loading
def load_manifest(folder: str | Path, verify_hashes: bool = True) -> Manifest:
    """Load and validate ``folder/manifest.json``; every problem names the fix.

    ``verify_hashes=False`` skips the sha256 of every file (sizes are still checked): for
    hosts that load the same trusted folder many times.
    """
    root = Path(folder)
    fix = f"re-export with `foresight-export --out {root} --overwrite`"
    if root.exists() and not root.is_dir():
        raise ManifestError(f"{root} is a file, not an engines folder: pass the folder foresight-export wrote")
    if not root.is_dir():
        raise ManifestError(f"engines folder {root} does not exist: build it with "
                            f"`foresight-export --model latte --preset tiny --out {root}`")
    from .outputs import is_temp_name

    if is_temp_name(root.resolve().name):
        raise ManifestError(f"{root} is an unfinished export's temporary folder, not an engines folder: "
                            f"run the export again (the next export or run removes it)")
    root = root.resolve()
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}: it is not an engines folder, or its export was "
                            f"interrupted; {fix}")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{mpath} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest; {fix}")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{mpath} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{mpath} is not a manifest object; {fix}")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ManifestError(f"{mpath} has no integer schema_version; {fix}")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{mpath} has schema version {version}, newer than this runtime's {SCHEMA_VERSION}: "
            f"upgrade foresight-dit (pip install -U foresight-dit) or re-export with this version"
        )
    if version < MIN_SCHEMA_VERSION:
        raise ManifestError(f"{mpath} has old schema version {version} (this runtime reads {MIN_SCHEMA_VERSION}.."
                            f"{SCHEMA_VERSION}); {fix}")
    _check_schema(data, mpath, fix)
    try:
        manifest = _parse(root, data)
        _check_references(manifest)
    except ValueError as exc:
        raise ManifestError(f"{mpath}: {exc}; {fix}") from None
    _check_files(manifest, verify_hashes, fix)
    return manifest


def describe_in_memory(data: dict, root: Path | None = None) -> Manifest:
    """A manifest for engines held in memory (no files: the torch backend handed its modules,
    e.g. tools/gpu_check.py): the same schema and cross-reference checks, no file checks.
    ``root``: where the section files it names live (AOTInductor packages a tool just built)."""
    where = Path(root) if root is not None else Path("<in-memory>")
    _check_schema(data, where, "fix the description")
    try:
        manifest = _parse(where, data)
        _check_references(manifest)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    return manifest


def _check_schema(data: dict, mpath: Path, fix: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"{mpath} does not follow the engines format at {where}: {error.message}; {fix}")


def _parse(root: Path, data: dict) -> Manifest:
    parts = data["parts"]
    tensorrt = data.get("tensorrt")
    return Manifest(
        root=root, name=data["name"], family=data["model"]["family"],
        model_config=MappingProxyType(data["model"]["config"]), dtype=data["dtype"],
        dims=Dims.parse(data["dims"]), shapes=MappingProxyType(data["shapes"]),
        stem=Part.parse(parts["stem"]), layers=tuple(map(Part.parse, parts["layers"])), head=Part.parse(parts["head"]),
        flow=Flow.parse(data["flow"]), pipeline=MappingProxyType(data["pipeline"]),
        components=MappingProxyType(dict(data["components"])),
        files=MappingProxyType({k: FileEntry(v["sha256"], v["bytes"]) for k, v in data["files"].items()}),
        foresight_defaults=MappingProxyType(data["foresight_defaults"]),
        source=MappingProxyType(data["model"].get("source", {})), tensorrt=tensorrt, aoti=data.get("aoti"),
        experts=tuple(map(Expert.parse, data.get("experts", ()))), raw=data,
    )


def _check_references(m: Manifest) -> None:
    """What the schema cannot state; raises ValueError naming the field."""
    names = [p.name for p in m.all_parts]
    if m.stem.name != "stem" or m.head.name != "head":
        raise ValueError("parts.stem and parts.head must be named 'stem' and 'head'")
    want = [f"layer_{i:03d}" for i in range(m.num_layers)]
    if [p.name for p in m.layers] != want:
        raise ValueError(f"parts.layers must be named {want[0]}..{want[-1]} in order")
    files = [p.file for p in m.all_parts] + [f for e in m.experts for f in e.files.values()]
    if len(set(files)) != len(files):
        raise ValueError("two parts name the same file")
    for k, e in enumerate(m.experts, 1):
        if list(e.files) != names:
            raise ValueError(f"experts[{k - 1}] ({e.name}).files must list every part in order ({names[0]}..{names[-1]})")
        if e.component not in m.components or e.component in ("transformer", *PIPELINE_COMPONENTS):
            raise ValueError(f"experts[{k - 1}] ({e.name}).component {e.component!r} must be a component of its own")
        if (e.aoti is None) != (m.aoti is None) or (e.aoti is not None and list(e.aoti) != names):
            raise ValueError(f"experts[{k - 1}] ({e.name}).aoti must list every part in order exactly when the "
                             f"folder has an aoti section")
        unknown = sorted({v["program"] for v in (e.aoti or {}).values()} - set((m.aoti or {}).get("programs", {})))
        if unknown:
            raise ValueError(f"experts[{k - 1}] ({e.name}).aoti names programs aoti.programs does not list: "
                             f"{', '.join(unknown)}")
    key = LAYER_COUNT_KEYS.get(m.family)
    declared = m.raw["model"]["num_layers"]
    if m.num_layers != declared or (key and m.model_config.get(key) != declared):
        raise ValueError(f"parts.layers lists {m.num_layers} layers, the model has "
                         f"{m.model_config.get(key, declared) if key else declared} (model.config.{key})")
    if set(m.dims.ranges) != set(FREE_DIMS):
        raise ValueError(f"dims must declare exactly the free symbols {', '.join(FREE_DIMS)} (the runtime binds "
                         f"those); others must derive from them (got {', '.join(m.dims.ranges)})")
    symbols = set(m.dims.symbols)
    for where, spec in [(p.name, t) for p in m.all_parts for t in (*p.inputs, *p.outputs)] + \
                       [("flow.pipeline_inputs", t) for t in m.flow.pipeline_inputs]:
        unknown = [d for d in spec.shape if isinstance(d, str) and d not in symbols]
        if unknown:
            raise ValueError(f"{where}: {spec.name} uses undeclared dim(s) {', '.join(unknown)}")
        if spec.dtype != m.dtype and not spec.fixed_dtype:
            raise ValueError(f"{where}: {spec.name} is {spec.dtype} in a {m.dtype} export (only fixed_dtype tensors "
                             f"keep their own dtype)")
    layer = m.layers[0]
    for other in m.layers[1:]:
        if (other.inputs, other.outputs) != (layer.inputs, layer.outputs):
            raise ValueError(f"{other.name} has other inputs/outputs than {layer.name}; layers must be alike")
    f = m.flow
    stem_out, stem_in = set(m.stem.output_names), set(m.stem.input_names)
    pipeline_in = {t.name for t in f.pipeline_inputs}
    state = set(f.state_init)

    def check_source(where: str, src: Source) -> None:
        pools = {"state": state, "stem": stem_out, "input": stem_in, "pipeline": pipeline_in}
        if src.name not in pools[src.kind]:
            raise ValueError(f"{where} reads {src.kind}:{src.name}, which does not exist")

    if not set(f.state_init.values()) <= stem_out:
        raise ValueError(f"flow.state_init names stem outputs that do not exist: {dict(f.state_init)}")
    if set(f.layer_state_out) != state or not set(f.layer_state_out.values()) <= set(layer.output_names):
        raise ValueError("flow.layer_state_out must continue every state of flow.state_init from a layer output")
    if set(f.layer_inputs) != set(layer.input_names):
        raise ValueError(f"flow.layer_inputs must give a source for exactly the layers' inputs {layer.input_names}")
    for name, src in f.layer_inputs.items():
        check_source(f"flow.layer_inputs.{name}", src)
    if set(f.head_inputs) != set(m.head.input_names):
        raise ValueError(f"flow.head_inputs must give a source for exactly the head's inputs {m.head.input_names}")
    for name, src in f.head_inputs.items():
        check_source(f"flow.head_inputs.{name}", src)
    missing = [p for p in f.probes if p not in layer.output_names]
    if missing:
        raise ValueError(f"flow.probes names {', '.join(missing)}, not outputs of the layers {layer.output_names}")
    if f.head_output not in m.head.output_names:
        raise ValueError(f"flow.head_output {f.head_output!r} is not an output of the head")
    if f.probes[-1] not in f.layer_state_out.values():
        raise ValueError("the last probe must be the layer output carried on (reuse feeds it to the next layer)")
    if m.aoti:
        a = m.aoti
        if list(a["parts"]) != names:
            raise ValueError(f"aoti.parts must list every part in order ({names[0]}..{names[-1]})")
        unknown = sorted({e["program"] for e in a["parts"].values()} - set(a["programs"]))
        if unknown:
            raise ValueError(f"aoti.parts name programs that aoti.programs does not list: {', '.join(unknown)}")
        if a["dtype"] != m.dtype:
            raise ValueError(f"aoti.dtype {a['dtype']} differs from the manifest's dtype {m.dtype}")
        unknown = sorted({e["program"] for e in a.get("components", {}).values()} - set(a["programs"]))
        if unknown:
            raise ValueError(f"aoti.components name programs that aoti.programs does not list: {', '.join(unknown)}")


def _inside(root: Path, relative: str) -> Path:
    """``root / relative`` with symlinks resolved, refused unless it stays inside ``root``."""
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ManifestError(f"{root / relative} resolves to {path}, outside the engines folder: the folder is refused")
    return path


def _check_files(m: Manifest, verify_hashes: bool, fix: str) -> None:
    root = m.root
    listed = {_inside(root, rel): (rel, entry) for rel, entry in m.files.items()}
    needed = [p.file for p in m.all_parts] + list(m.components.values())
    if m.tensorrt:
        needed += [e["file"] for e in m.tensorrt.get("engines", {}).values()]
        if m.tensorrt.get("timing_cache"):
            needed.append(m.tensorrt["timing_cache"])
    if m.aoti:
        needed += [e["file"] for e in m.aoti["programs"].values()] + [e["weights"] for e in m.aoti["parts"].values()]
        needed += [e["weights"] for e in m.aoti.get("components", {}).values()]
    for expert in m.experts:
        needed += list(expert.files.values()) + [e["weights"] for e in (expert.aoti or {}).values()]
    for rel in needed:  # relative without `..` by the schema; _inside catches symlinks leading out
        path = _inside(root, rel)
        if path.is_dir():  # a component folder: every file in it is listed, nothing else is in it
            for file in sorted(p for p in path.rglob("*") if not p.is_dir()):
                if _inside(root, str(file.relative_to(root))) not in listed:
                    raise ManifestError(f"{file} is in the engines folder but not in its manifest (an unlisted file "
                                        f"a loader could read); remove it or {fix}")
        elif path not in listed:
            raise ManifestError(f"{root / rel} is used by the manifest but not listed with a hash in its files; {fix}")
    for path, (rel, entry) in listed.items():
        if not path.is_file():
            raise ManifestError(f"{root / rel} listed in the manifest is missing; {fix}")
        if path.stat().st_size != entry.bytes:
            raise ManifestError(f"{root / rel} has {path.stat().st_size} bytes, the manifest says {entry.bytes} "
                                f"(corrupt, truncated or replaced file); {fix}")
        if verify_hashes and sha256_file(path) != entry.sha256:
            raise ManifestError(f"{root / rel} does not match the sha256 recorded in the manifest "
                                f"(corrupt or replaced file); {fix}")


def file_table(folder: Path) -> dict[str, dict]:
    """``{relative path: {"sha256", "bytes"}}`` of every file under ``folder`` but the manifest:
    what an exporter writes as the manifest's ``files``."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST_NAME}
