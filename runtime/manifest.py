"""The engines folder's manifest: schema, loading with validation, symbolic shapes.

The manifest is the only thing the runtime knows about how a model was exported: which
files exist, their hashes, each part's inputs/outputs with symbolic shapes, what flows
from part to part, which layer outputs are Foresight probes, and the pipeline facts
(scheduler, text encoder, VAE) needed to turn a prompt into a video.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ManifestError, ShapeError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("schema_version", "name", "model", "dims", "parts", "flow", "pipeline", "foresight_defaults", "shapes")
PART_KEYS = ("name", "file", "sha256", "inputs", "outputs")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def stem(self) -> dict:
        return self.data["parts"]["stem"]

    @property
    def layers(self) -> list[dict]:
        return self.data["parts"]["layers"]

    @property
    def head(self) -> dict:
        return self.data["parts"]["head"]

    @property
    def all_parts(self) -> list[dict]:
        return [self.stem, *self.layers, self.head]

    @property
    def flow(self) -> dict:
        return self.data["flow"]

    @property
    def pipeline(self) -> dict:
        return self.data["pipeline"]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def bind_dims(self, **values: int) -> dict[str, int]:
        """Check base symbol values against the built ranges and add the derived ones."""
        dims = {}
        for sym, spec in self.data["dims"].items():
            if "of" in spec:
                continue
            if sym not in values:
                raise ShapeError(f"no value for dimension {sym!r}")
            v = int(values[sym])
            if not spec["min"] <= v <= spec["max"]:
                raise ShapeError(f"dimension {sym}={v} is outside the exported range [{spec['min']}, {spec['max']}]")
            dims[sym] = v
        for sym, spec in self.data["dims"].items():
            if "of" in spec:
                dims[sym] = dims[spec["of"]] * spec["times"]
        return dims

    @staticmethod
    def shape_of(io: dict, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in io["shape"])


def load_manifest(folder: str | Path, verify_hashes: bool = True) -> Manifest:
    """Load and validate ``folder/manifest.json``; every problem names the fix."""
    root = Path(folder)
    fix = f"re-export with `foresight-export --out {root}`"
    if not root.is_dir():
        raise ManifestError(f"engines folder {root} does not exist: build it with `foresight-export --model latte --preset tiny --out {root}`")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}: it is not an engines folder, or its export was interrupted; {fix}")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{mpath} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{mpath} is not a manifest object; {fix}")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ManifestError(f"{mpath} has no integer schema_version; {fix}")
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"{mpath} has schema version {version}, newer than this runtime's {SCHEMA_VERSION}: "
            f"upgrade foresight-dit (pip install -U foresight-dit) or re-export with this version"
        )
    if version < SCHEMA_VERSION:
        raise ManifestError(f"{mpath} has old schema version {version} (this runtime reads {SCHEMA_VERSION}); {fix}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ManifestError(f"{mpath} misses required field(s) {', '.join(missing)}; {fix}")
    parts = data["parts"]
    if not isinstance(parts, dict) or not {"stem", "layers", "head"} <= parts.keys() or not parts["layers"]:
        raise ManifestError(f"{mpath}: 'parts' must hold stem, a non-empty layers list and head; {fix}")
    manifest = Manifest(root, data)
    for part in manifest.all_parts:
        absent = [k for k in PART_KEYS if k not in part]
        if absent:
            raise ManifestError(f"{mpath}: part {part.get('name', '?')} misses {', '.join(absent)}; {fix}")
        file = root / part["file"]
        if not file.is_file():
            raise ManifestError(f"{file} listed in the manifest is missing; {fix}")
        if verify_hashes and sha256_file(file) != part["sha256"]:
            raise ManifestError(
                f"{file} does not match the sha256 recorded in the manifest (corrupt or replaced file); {fix}"
            )
    for comp in ("text_encoder", "tokenizer", "vae", "scheduler"):
        if not (root / data["pipeline"].get(comp, comp)).is_dir():
            raise ManifestError(f"{root / comp} (the {comp}) is missing from the engines folder; {fix}")
    return manifest
