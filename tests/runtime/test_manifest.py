"""The engines folder is a checked contract: schema, paths inside the folder, every file hashed,
engines in the right slots, sane sizes, consistent layers and flow — all before any allocation."""

from __future__ import annotations

import json
import os
import socket

import pytest

from runtime import Runtime
from runtime.errors import BackendError, ManifestError
from runtime.manifest import SCHEMA_FILE, file_table, load_manifest, schema, sha256_file

PROMPT = "a red square moving left on a gray background"


def edit(folder, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def relist(folder) -> None:
    """Refresh the files table, as an attacker who can edit the manifest would."""
    edit(folder, lambda d: d.__setitem__("files", file_table(folder)))


def test_schema_ships_with_the_package_and_validates_a_fresh_export(engines_dir):
    import jsonschema

    assert SCHEMA_FILE.is_file()
    jsonschema.Draft202012Validator(schema()).validate(json.loads((engines_dir / "manifest.json").read_text()))


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.onnx", "sub/../../x.onnx", "./stem.onnx"])
def test_part_paths_outside_the_folder_are_refused(engines_copy, bad):
    edit(engines_copy, lambda d: d["parts"]["layers"][0].__setitem__("file", bad))
    with pytest.raises(ManifestError, match="engines format"):
        load_manifest(engines_copy)


def test_files_table_paths_outside_the_folder_are_refused(engines_copy):
    edit(engines_copy, lambda d: d["files"].__setitem__("/etc/passwd", {"sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(ManifestError):
        load_manifest(engines_copy)


def test_component_paths_outside_the_folder_are_refused(engines_copy, tmp_path):
    edit(engines_copy, lambda d: d["components"].__setitem__("vae", "../vae"))
    with pytest.raises(ManifestError):
        load_manifest(engines_copy)


def test_a_symlink_leading_out_of_the_folder_is_refused(engines_copy, tmp_path):
    outside = tmp_path / "outside.onnx"
    (engines_copy / "layer_000.onnx").rename(outside)
    os.symlink(outside, engines_copy / "layer_000.onnx")
    with pytest.raises(ManifestError, match="outside the engines folder"):
        load_manifest(engines_copy)


@pytest.mark.parametrize("component", ["vae/config.json", "text_encoder/model.safetensors",
                                       "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                                       "transformer/config.json"])
def test_every_component_file_is_hash_checked(engines_copy, component):
    path = engines_copy / component
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit flipped
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        load_manifest(engines_copy)
    load_manifest(engines_copy, verify_hashes=False)  # the opt-out still checks sizes, not contents


def test_a_truncated_file_is_refused_even_without_hash_checks(engines_copy):
    path = engines_copy / "text_encoder" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ManifestError, match="bytes"):
        load_manifest(engines_copy, verify_hashes=False)


def test_an_unlisted_file_in_a_component_folder_is_refused(engines_copy):
    (engines_copy / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"a loader could pick this up")
    with pytest.raises(ManifestError, match="not in its manifest"):
        load_manifest(engines_copy)


def test_an_engine_in_the_wrong_slot_is_refused_naming_it(engines_copy):
    """A valid ONNX file with the right hash in another part's slot: refused at load, no traceback."""
    (engines_copy / "layer_000.onnx").write_bytes((engines_copy / "head.onnx").read_bytes())
    relist(engines_copy)
    with pytest.raises(BackendError, match="not the engine of layer_000"):
        Runtime.load(engines_copy, backend="onnxruntime", device="cpu")


@pytest.mark.parametrize("change, match", [
    (lambda d: d["dims"]["h"].__setitem__("max", 1_000_000), "dims/h"),
    (lambda d: d["dims"]["w"].__setitem__("min", -2), "dims/w"),
    (lambda d: d["dims"]["F"].__setitem__("opt", 2.5), "dims/F"),
    (lambda d: d["dims"]["T"].__setitem__("max", "120"), "dims/T"),
    (lambda d: d["dims"]["H"].__setitem__("of", "nope"), "nope"),
    (lambda d: d["dims"]["B"].update({"min": 2, "opt": 1}), "min <= opt"),
])
def test_dims_are_bounded_and_typed_before_any_allocation(engines_copy, change, match):
    edit(engines_copy, change)
    with pytest.raises(ManifestError, match=match):
        load_manifest(engines_copy)


def test_a_layer_list_shorter_than_the_model_is_refused(engines_copy):
    def drop_last(d):
        d["parts"]["layers"].pop()
        d["model"]["num_layers"] -= 1

    edit(engines_copy, drop_last)
    with pytest.raises(ManifestError, match="layers"):
        load_manifest(engines_copy)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["flow"].__setitem__("probes", ["spatial", "no_such_output"]), "probes"),
    (lambda d: d["flow"]["layer_inputs"].__setitem__("temb", "stem:missing"), "stem:missing"),
    (lambda d: d["flow"]["layer_inputs"].__setitem__("temb", "disk:/etc/passwd"), "engines format"),
    (lambda d: d["flow"].__setitem__("head_output", "nope"), "head_output"),
    (lambda d: d["parts"]["layers"][0]["inputs"][0]["shape"].__setitem__(0, "Q"), "undeclared"),
])
def test_flow_sources_and_probes_are_resolved_at_load(engines_copy, change, match):
    edit(engines_copy, change)
    with pytest.raises(ManifestError, match=match):
        load_manifest(engines_copy)


def test_manifest_from_a_newer_version_names_the_upgrade(engines_copy):
    edit(engines_copy, lambda d: d.__setitem__("schema_version", 4))
    with pytest.raises(ManifestError, match="upgrade"):
        load_manifest(engines_copy)


def test_typed_objects_replace_raw_dicts(engines_dir):
    m = load_manifest(engines_dir)
    assert m.stem.name == "stem" and [p.name for p in m.layers][:1] == ["layer_000"]
    dims = m.dims.bind(B=2, F=4, h=5, w=6, T=7)
    assert (dims["H"], dims["W"]) == (5 * m.dims.derived["H"][1], 6 * m.dims.derived["W"][1])
    src = m.flow.layer_inputs["temb"]
    assert (src.kind, src.name) == ("stem", "temb")
    assert m.files[m.stem.file].sha256 == sha256_file(engines_dir / m.stem.file)


def test_the_torch_backend_reads_only_the_folder_and_never_the_network(engines_copy, monkeypatch):
    """The source checkpoint recorded in the manifest may be a hub id or gone: the reference
    backend's weights are the folder's own transformer/."""
    edit(engines_copy, lambda d: d["model"].__setitem__("source", {"checkpoint": "maxin-cn/Latte-1", "preset": None}))

    def no_network(*args, **kwargs):
        raise AssertionError("the runtime tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    rt = Runtime.load(engines_copy, backend="torch", device="cpu")
    result = rt.generate(PROMPT, num_inference_steps=2, policy="none", decode=False)
    assert result.stats["layer_engine_calls"] == 2 * rt.num_layers


def test_the_torch_backend_without_weights_in_the_folder_is_refused(engines_copy):
    edit(engines_copy, lambda d: d["components"].pop("transformer"))
    for f in (engines_copy / "transformer").iterdir():
        f.unlink()
    (engines_copy / "transformer").rmdir()
    relist(engines_copy)
    with pytest.raises(BackendError, match="no transformer weights"):
        Runtime.load(engines_copy, backend="torch", device="cpu")


def test_an_engines_path_that_is_a_file_says_so(tmp_path):
    (tmp_path / "engines").write_text("not a folder")
    with pytest.raises(ManifestError, match="is a file"):
        load_manifest(tmp_path / "engines")
