"""foresight-export never destroys what it did not create, and its files are readable by others."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from exporter.cli import main
from exporter.export import ExportError, ExportOptions, export
from exporter.families.base import FolderComponent
from runtime.errors import ForesightError, ManifestError
from runtime.manifest import load_manifest


def run_export(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir()
    (path / "data" / "x.csv").write_text("1,2,3")
    return path


def contents(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_is_not_an_engines_folder(tmp_path, capsys):
    folder = user_folder(tmp_path / "mine")
    before = contents(folder)
    code, err = run_export(capsys, "--model", "latte", "--preset", "tiny", "--out", folder, "--overwrite")
    assert code == 2 and "error:" in err and "not an engines folder" in err and "Traceback" not in err
    assert contents(folder) == before


def test_out_onto_or_around_the_checkpoint_is_refused(tmp_path, capsys, preset_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(preset_dir, ckpt)
    before = contents(ckpt)
    for out in (ckpt, ckpt / "engines", tmp_path):  # equal to, inside, containing
        code, err = run_export(capsys, "--model", "latte", "--model-path", ckpt, "--out", out, "--overwrite")
        assert code == 2 and "checkpoint" in err and "Traceback" not in err, (out, err)
    assert contents(ckpt) == before


def test_out_dot_and_parents_of_the_current_folder_are_refused(tmp_path, capsys, monkeypatch):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, err = run_export(capsys, "--model", "latte", "--preset", "tiny", "--out", out, "--overwrite")
        assert code == 2 and "current folder" in err, (out, err)
    assert (work / "thesis.tex").read_text() == "years of work"


def test_unwritable_location_is_an_error_even_for_root(tmp_path, capsys):
    # /sys refuses mkdir whatever os.access says for root.
    code, err = run_export(capsys, "--model", "latte", "--preset", "tiny", "--out", "/sys/foresight-engines")
    assert code == 2 and "error:" in err and "Traceback" not in err
    assert not Path("/sys/foresight-engines").exists()


def test_a_too_long_out_name_says_so(tmp_path, capsys):
    code, err = run_export(capsys, "--model", "latte", "--preset", "tiny", "--out", tmp_path / ("e" * 240))
    assert code == 2 and "too long" in err and "not writable" not in err
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_killed_exports_are_removed(tmp_path, monkeypatch):
    """A killed export leaves `.name.tmp-PID-XXXX/`; the next export of that name removes it
    (only when its process is gone) and never touches other folders."""
    import exporter.export as export_mod

    out = tmp_path / "engines"
    dead = tmp_path / f".engines.tmp-{2**22 + 12345}-0123abcd"  # above pid_max: no such process
    alive = tmp_path / f".engines.tmp-{os.getpid()}-0123abcd"
    other = tmp_path / ".engines.tmp-keep"
    for d in (dead, alive, other):
        d.mkdir()

    def fail(*a, **k):
        raise ExportError("stop here")

    monkeypatch.setattr(export_mod, "get_family", lambda name: type("F", (), {"load": fail, "presets": {"tiny": "x"},
                                                                              "name": "latte"})())
    monkeypatch.setattr(export_mod, "resolve_model_path", lambda family, path, preset: str(tmp_path / "ckpt"))
    with pytest.raises(ExportError):
        export(ExportOptions(model="latte", preset="tiny", out=out), progress=False)
    assert not dead.exists() and alive.exists() and other.exists()


def test_runtime_refuses_an_unfinished_exports_temporary_folder(engines_dir, tmp_path):
    tmp = tmp_path / f".latte.tmp-{os.getpid()}-0123abcd"
    shutil.copytree(engines_dir, tmp)
    with pytest.raises(ManifestError, match="temporary folder"):
        load_manifest(tmp)


def test_component_folders_are_copied_not_linked(tmp_path, preset_dir):
    """Editing an engines folder must not edit the checkpoint (hard links share the file)."""
    src = tmp_path / "src"
    shutil.copytree(preset_dir / "vae", src)
    FolderComponent(src).save_pretrained(tmp_path / "copy")
    FolderComponent(src).save_pretrained(tmp_path / "linked", link=True)
    for f in src.iterdir():
        assert not os.path.samefile(f, tmp_path / "copy" / f.name)
        assert os.path.samefile(f, tmp_path / "linked" / f.name)  # only when asked for


def test_exported_files_are_readable_by_other_users(engines_dir, preset_dir):
    umask = os.umask(0)
    os.umask(umask)
    for path in [engines_dir, *engines_dir.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path
    # and nothing in the folder shares its inode with the shipped checkpoint
    shipped = {os.stat(p).st_ino for p in preset_dir.rglob("*") if p.is_file()}
    assert not shipped & {os.stat(p).st_ino for p in engines_dir.rglob("*") if p.is_file()}


def test_every_file_is_listed_with_its_hash_and_nothing_else_is_read(engines_dir):
    m = load_manifest(engines_dir)
    on_disk = {p.relative_to(engines_dir).as_posix() for p in engines_dir.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(m.files) == on_disk
    assert {"transformer", "text_encoder", "tokenizer", "vae", "scheduler"} <= set(m.components)
    assert all(len(e.sha256) == 64 for e in m.files.values())
    raw = json.loads((engines_dir / "manifest.json").read_text())
    assert raw["schema_version"] == 2 and raw["model"]["num_layers"] == m.num_layers


def test_overwrite_replaces_an_engines_folder(engines_dir, tmp_path):
    """The one folder --overwrite may replace: an engines folder. Checked up to the replace (the
    export itself is covered by the session fixture)."""
    from exporter.export import check_out

    out = tmp_path / "e"
    shutil.copytree(engines_dir, out)
    assert check_out(out, str(tmp_path / "elsewhere"), overwrite=True) == out.resolve()
    with pytest.raises(ForesightError, match="already exists"):
        check_out(out, str(tmp_path / "elsewhere"), overwrite=False)
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty", str(tmp_path / "elsewhere"), overwrite=True)
