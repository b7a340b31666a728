"""The exporter's artifacts and its failure behaviour.

Full exports cost about 20 s each: besides the session's ``engines_dir`` this module runs
exactly one more (the ``--model-path`` export over an existing folder with
``--overwrite``); every failure path is stopped before or stubbed out of the ONNX export.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import exporter.export as export_mod
from exporter.cli import main
from exporter.export import ExportError, ExportOptions, export
from runtime.manifest import FORMAT, MANIFEST_NAME, MIN_SCHEMA_VERSION, SCHEMA_VERSION, load_manifest

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")


def all_parts(manifest: dict) -> list[dict]:
    return [manifest["parts"]["stem"], *manifest["parts"]["layers"], manifest["parts"]["head"]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: a folder is untouched iff this is unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def manifest(engines_dir) -> dict:
    return json.loads((engines_dir / "manifest.json").read_text())


@pytest.fixture(scope="module")
def preset_config(preset_dir) -> SimpleNamespace:
    return SimpleNamespace(
        transformer=json.loads((preset_dir / "transformer" / "config.json").read_text()),
        vae=json.loads((preset_dir / "vae" / "config.json").read_text()),
        index=json.loads((preset_dir / "model_index.json").read_text()),
    )


# --- the manifest and the files it points at ------------------------------------------------

def test_manifest_loads_and_has_current_schema(engines_dir, manifest, preset_config):
    loaded = load_manifest(engines_dir)
    assert manifest["schema_version"] == MIN_SCHEMA_VERSION  # one transformer: readable by version-2 readers
    assert loaded.num_layers == preset_config.transformer["num_layers"]
    assert [p.name for p in loaded.all_parts] == (
        ["stem"] + [f"layer_{i:03d}" for i in range(preset_config.transformer["num_layers"])] + ["head"]
    )
    for key, value in preset_config.transformer.items():
        if not key.startswith("_"):
            assert manifest["model"]["config"][key] == value, key


def test_part_hashes_are_the_files_real_hashes(engines_dir, manifest):
    """Schema 2: parts carry no hashes; the manifest's ``files`` lists every file in the folder
    but the manifest itself (part files, components, transformer weights) with its sha256 and size."""
    on_disk = {p.relative_to(engines_dir).as_posix() for p in engines_dir.rglob("*")
               if p.is_file() and p != engines_dir / MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk
    for part in all_parts(manifest):
        assert "sha256" not in part and "bytes" not in part, part["name"]
        assert part["file"] in manifest["files"], part["name"]
    for rel, entry in manifest["files"].items():
        file = engines_dir / rel
        assert entry["sha256"] == sha256(file), rel
        assert entry["bytes"] == file.stat().st_size, rel


def test_onnx_graph_io_matches_manifest(engines_dir, manifest):
    """Names and order match; a manifest symbol is a dim_param, an int is that dim_value, and on
    each graph's inputs one symbol is one dim_param (so ORT ties equal dims together)."""
    import onnx

    for part in all_parts(manifest):
        model = onnx.load(str(engines_dir / part["file"]), load_external_data=False)
        for kind, specs, values in (("input", part["inputs"], model.graph.input),
                                    ("output", part["outputs"], model.graph.output)):
            assert [v.name for v in values] == [s["name"] for s in specs], f"{part['name']} {kind}s"
            param_of: dict[str, str] = {}
            for spec, value in zip(specs, values):
                assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, f"{part['name']}.{spec['name']}"
                dims = value.type.tensor_type.shape.dim
                assert len(dims) == len(spec["shape"]), f"{part['name']}.{spec['name']} rank"
                for axis, (want, got) in enumerate(zip(spec["shape"], dims)):
                    where = f"{part['name']}.{spec['name']} axis {axis}"
                    if isinstance(want, str):
                        assert got.HasField("dim_param") and not got.HasField("dim_value"), f"{where} is fixed"
                        if kind == "input":
                            assert param_of.setdefault(want, got.dim_param) == got.dim_param, f"{where}: {want} split"
                    else:
                        assert got.HasField("dim_value") and got.dim_value == want, where
            if kind == "input":
                params = list(param_of.values())
                assert len(set(params)) == len(params), f"{part['name']}: two symbols share a dim_param {param_of}"


def test_recorded_validation_is_within_tolerance_at_two_shapes(manifest):
    tolerance = manifest["validation"]["tolerance"]
    assert 0 < tolerance <= 1e-4  # fp32 export
    for part in all_parts(manifest):
        records = part["validation"]
        assert len(records) >= 2, part["name"]
        shapes = {tuple(sorted(r["dims"].items())) for r in records}
        assert len(shapes) == len(records), f"{part['name']}: validation shapes repeat"
        for r in records:
            for sym, spec in manifest["dims"].items():
                if "of" in spec:
                    assert r["dims"][sym] == r["dims"][spec["of"]] * spec["times"]
                else:
                    assert spec["min"] <= r["dims"][sym] <= spec["max"], (part["name"], sym)
            assert set(r["max_rel_error"]) == {o["name"] for o in part["outputs"]}, part["name"]
            for out, err in r["max_rel_error"].items():
                assert 0 <= err < tolerance, f"{part['name']}.{out}: {err}"


def test_dims_and_shapes_are_consistent(manifest, preset_config):
    cfg, dims, shapes = preset_config.transformer, manifest["dims"], manifest["shapes"]
    vae_factor = 2 ** (len(preset_config.vae["block_out_channels"]) - 1)
    px = cfg["patch_size"] * vae_factor
    for sym, spec in dims.items():
        if "of" in spec:
            assert spec["of"] in dims and "of" not in dims[spec["of"]], sym
            assert spec["times"] == cfg["patch_size"], sym
        else:
            assert 1 <= spec["min"] <= spec["opt"] <= spec["max"], sym
    assert dims["H"]["of"] == "h" and dims["W"]["of"] == "w"
    assert dims["F"]["max"] <= cfg["video_length"]  # temp_pos_embed has video_length rows
    for axis, sym in (("height", "h"), ("width", "w")):
        s = shapes[axis]
        assert s["multiple_of"] == px
        assert (s["min"], s["max"], s["default"]) == (dims[sym]["min"] * px, dims[sym]["max"] * px, dims[sym]["opt"] * px)
        assert s["default"] == cfg["sample_size"] * vae_factor
    assert (shapes["frames"]["min"], shapes["frames"]["max"], shapes["frames"]["default"]) == (
        dims["F"]["min"], dims["F"]["max"], dims["F"]["opt"])
    assert (shapes["batch"]["min"], shapes["batch"]["max"]) == (dims["B"]["min"], dims["B"]["max"])
    assert shapes["text_tokens"]["max"] == dims["T"]["max"]
    assert manifest["pipeline"]["vae_scale_factor"] == vae_factor
    assert manifest["pipeline"]["patch_size"] == cfg["patch_size"]


def test_flow_references_real_part_io(manifest):
    flow = manifest["flow"]
    stem, layer, head = manifest["parts"]["stem"], manifest["parts"]["layers"][0], manifest["parts"]["head"]
    names = lambda ios: {io["name"] for io in ios}  # noqa: E731
    for part in manifest["parts"]["layers"]:
        assert part["inputs"] == layer["inputs"] and part["outputs"] == layer["outputs"]

    state = set(flow["state_init"])
    assert set(flow["state_init"].values()) <= names(stem["outputs"])
    assert set(flow["layer_state_out"]) == state
    assert set(flow["layer_state_out"].values()) <= names(layer["outputs"])

    def check_source(ref: str):
        src, name = ref.split(":")
        assert (src == "state" and name in state) or (src == "stem" and name in names(stem["outputs"])), ref

    assert set(flow["layer_inputs"]) == names(layer["inputs"])
    assert set(flow["head_inputs"]) == names(head["inputs"])
    for ref in [*flow["layer_inputs"].values(), *flow["head_inputs"].values()]:
        check_source(ref)
    assert flow["head_output"] in names(head["outputs"])
    assert flow["probes"] and set(flow["probes"]) <= names(layer["outputs"])


def test_pipeline_components_load_and_match_the_preset(engines_dir, preset_dir, manifest, preset_config):
    import diffusers
    import torch
    import transformers

    for name in COMPONENTS:
        folder = engines_dir / manifest["components"][name]
        assert folder.is_dir(), name
        library, cls_name = preset_config.index[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        if name == "scheduler":
            got, want = cls.from_pretrained(folder), cls.from_pretrained(preset_dir, subfolder=name)
            assert dict(got.config) == dict(want.config)
        elif name == "tokenizer":
            got, want = cls.from_pretrained(folder), cls.from_pretrained(preset_dir, subfolder=name)
            prompt = "a red fox runs through snow"
            assert got(prompt).input_ids == want(prompt).input_ids
        else:
            got, want = cls.from_pretrained(folder), cls.from_pretrained(preset_dir, subfolder=name)
            gs, ws = got.state_dict(), want.state_dict()
            assert gs.keys() == ws.keys(), name
            assert all(torch.equal(gs[k], ws[k]) for k in gs), name


# --- atomic export ----------------------------------------------------------------------------

class Boom(RuntimeError):
    pass


def stub_export(monkeypatch, fail_at: int, exc: type[BaseException]) -> list[str]:
    """Replace the ONNX export with a file write and make validation raise on part ``fail_at``."""
    calls: list[str] = []

    def fake_export_part(part, dims_spec, path, generator):
        path.write_bytes(b"partial onnx")  # something in the tmp folder to clean up

    def fake_validate_part(part, path, dims_spec, generator):
        calls.append(part.name)
        assert path.is_file()
        if len(calls) == fail_at:
            raise exc(f"injected failure in {part.name}")
        return [{"dims": {}, "max_rel_error": {o.name: 0.0 for o in part.outputs}}]

    monkeypatch.setattr(export_mod, "export_part", fake_export_part)
    monkeypatch.setattr(export_mod, "validate_part", fake_validate_part)
    return calls


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failed_export_leaves_no_out_and_no_tmp(monkeypatch, tmp_path, exc):
    calls = stub_export(monkeypatch, fail_at=3, exc=exc)
    out = tmp_path / "latte-tiny"
    with pytest.raises(exc, match="layer_001"):
        export(ExportOptions(model="latte", preset="tiny", out=out), progress=False)
    assert calls == ["stem", "layer_000", "layer_001"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .latte-tiny.tmp-* left behind


def test_failed_overwrite_keeps_the_previous_export(monkeypatch, tmp_path):
    out = tmp_path / "latte-tiny"
    out.mkdir()
    # --overwrite replaces only an engines folder: the previous export's manifest names the format.
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT, "schema_version": SCHEMA_VERSION,
                                                   "previous": True}))
    before = snapshot(out)
    calls = stub_export(monkeypatch, fail_at=3, exc=Boom)
    with pytest.raises(Boom):
        export(ExportOptions(model="latte", preset="tiny", out=out, overwrite=True), progress=False)
    assert len(calls) == 3
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["latte-tiny"]


def test_existing_out_without_overwrite_is_refused_and_untouched(monkeypatch, tmp_path):
    out = tmp_path / "latte-tiny"
    out.mkdir()
    (out / "manifest.json").write_text('{"previous": true}')
    (out / "stem.onnx").write_bytes(b"\x00\x01")
    before = snapshot(out)
    calls = stub_export(monkeypatch, fail_at=1, exc=Boom)
    with pytest.raises(ExportError, match="--overwrite"):
        export(ExportOptions(model="latte", preset="tiny", out=out), progress=False)
    assert calls == []  # refused before any work
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["latte-tiny"]


@pytest.fixture(scope="module")
def model_path_export(tmp_path_factory, preset_dir):
    """The one extra full export: a full copy of the preset via --model-path (the real-checkpoint
    path), written with --overwrite over an existing folder holding a stale export."""
    root = tmp_path_factory.mktemp("model_path")
    ckpt = root / "checkpoint"
    shutil.copytree(preset_dir, ckpt)
    out = root / "engines"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    # An engines folder of an older version (--overwrite replaces only engines folders).
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT, "schema_version": 0}))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["--model", "latte", "--model-path", str(ckpt), "--out", str(out), "--overwrite"])
    return SimpleNamespace(rc=rc, out=out, ckpt=ckpt, root=root, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def test_overwrite_replaces_the_existing_folder(model_path_export):
    r = model_path_export
    assert r.rc == 0, r.stderr
    assert r.stdout.strip().endswith(f"wrote {r.out}/manifest.json")
    assert not (r.out / "stale.txt").exists()
    manifest = load_manifest(r.out)
    assert manifest.raw["schema_version"] == MIN_SCHEMA_VERSION
    assert manifest.name == r.out.name
    assert sorted(p.name for p in r.root.iterdir()) == ["checkpoint", "engines"]  # no .tmp-/.old- left


def test_model_path_export_matches_the_preset_export(model_path_export, engines_dir, manifest):
    r = model_path_export
    assert r.rc == 0, r.stderr
    other = json.loads((r.out / "manifest.json").read_text())
    assert other["model"]["source"] == {"checkpoint": str(r.ckpt.resolve()), "preset": None}
    assert other["model"]["config"]["num_layers"] == manifest["model"]["config"]["num_layers"]

    # Same weights give byte-identical files: the exporter strips torch's metadata (stack
    # traces with local paths, constraint lists in PYTHONHASHSEED order) after export.
    for mine, theirs in zip(all_parts(other), all_parts(manifest)):
        assert mine["name"] == theirs["name"] and mine["file"] == theirs["file"]
        assert other["files"][mine["file"]]["sha256"] == manifest["files"][theirs["file"]]["sha256"], mine["name"]


# --- CLI errors -----------------------------------------------------------------------------

def assert_one_line_error(capsys, rc: int, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("foresight-export: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "wrote" not in captured.out
    return lines[0]


def test_cli_unknown_model(capsys, tmp_path):
    rc = main(["--model", "nope", "--preset", "tiny", "--out", str(tmp_path / "x")])
    assert_one_line_error(capsys, rc, "'nope'", "latte")
    assert not (tmp_path / "x").exists()


def test_cli_unknown_preset(capsys, tmp_path):
    rc = main(["--model", "latte", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert_one_line_error(capsys, rc, "'huge'", "tiny")
    assert not (tmp_path / "x").exists()


def test_cli_missing_model_path(capsys, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    rc = main(["--model", "latte", "--model-path", str(missing), "--out", str(tmp_path / "x")])
    assert_one_line_error(capsys, rc, str(missing), "does not exist")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("model, where", [("latte", "maxin-cn/Latte-1"), ("cogvideox", "THUDM/CogVideoX-2b"),
                                          ("opensora", "hpcai-tech/OpenSora-VAE-v1.2")])
def test_cli_incomplete_checkpoint_names_the_missing_folder(capsys, tmp_path, model, where):
    from exporter.families import get_family

    ckpt = tmp_path / "ckpt"
    shutil.copytree(get_family(model).presets["tiny"], ckpt)
    shutil.rmtree(ckpt / "vae")
    rc = main(["--model", model, "--model-path", str(ckpt), "--out", str(tmp_path / "x")])
    line = assert_one_line_error(capsys, rc, "vae/")
    assert where in line
    assert line.split("missing ", 1)[1].split(".", 1)[0] == "vae/"  # only what is missing
    assert not (tmp_path / "x").exists()


def test_cli_out_parent_missing(capsys, tmp_path):
    out = tmp_path / "missing-parent" / "engines"
    rc = main(["--model", "latte", "--preset", "tiny", "--out", str(out)])
    assert_one_line_error(capsys, rc, "does not exist")
    assert not out.parent.exists()


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    out = tmp_path / "x"
    proc = subprocess.run(
        [sys.executable, "-m", "exporter.cli", "--model", "nope", "--preset", "tiny", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "foresight-export: error:" in proc.stderr
    assert not out.exists()
