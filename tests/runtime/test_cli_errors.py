"""foresight-run on bad input: `error: ...` naming the fix, exit 2, no traceback, nothing written;
interrupts say truthfully whether the outputs exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import runtime.cli as cli
from runtime.manifest import file_table

PROMPT = "a red square moving left on a gray background"


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_refused(code, err, folder: Path, *words):
    assert code == 2, err
    assert "foresight-run: error:" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert [p.name for p in folder.iterdir() if not p.name.startswith("engines")] == []


@pytest.mark.parametrize("flags, words", [
    (["--steps", 10000], ["steps", "1..1000"]),
    (["--steps", 0], ["steps"]),
    (["--seed", 2**70], ["seed", "2**64-1"]),
    (["--seed", -1], ["seed"]),
    (["--guidance", "nan"], ["guidance"]),
    (["--guidance", "inf"], ["guidance"]),
    (["--guidance", -1], ["guidance"]),
    (["--device", "cuda"], ["CUDA", "--device cpu"]),
    (["--device", "tpu"], ["device"]),
    (["--device", "meta"], ["cpu or cuda"]),
    (["--device", "cuda:banana"], ["device"]),
    (["--fps", 0], ["fps"]),
    (["--guidance-2", 3], ["--guidance-2", "one transformer", "drop it"]),
])
def test_bad_generation_arguments(engines_dir, tmp_path, capsys, flags, words):
    if flags[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.mp4",
                        "--stats", tmp_path / "s.json", *flags)
    assert_refused(code, err, tmp_path, *words)


@pytest.mark.parametrize("flag, name", [("--stats", "manifest.json"), ("--heatmap", "x.png"),
                                        ("--save-frames", "vae/x.npy"), ("--out", "o.mp4")])
def test_outputs_inside_the_engines_folder_are_refused(engines_copy, tmp_path, capsys, flag, name):
    before = (engines_copy / "manifest.json").read_bytes()
    args = {"--out": tmp_path / "o.mp4", flag: engines_copy / name}
    code, err = run_cli(capsys, "--engines", engines_copy, "--prompt", PROMPT, *[x for kv in args.items() for x in kv])
    assert code == 2 and "inside the engines folder" in err and "Traceback" not in err
    assert (engines_copy / "manifest.json").read_bytes() == before
    assert not (tmp_path / "o.mp4").exists()


def test_two_outputs_on_one_file_are_refused(engines_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.gif",
                        "--stats", tmp_path / "s.json", "--heatmap", tmp_path / "s.json")
    assert code == 2 and ("two outputs" in err or "both write" in err or "suffix" in err or "extension" in err)


def test_a_240_character_output_name_is_reported_as_too_long(engines_dir, tmp_path, capsys):
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / ("v" * 236 + ".mp4"))
    assert_refused(code, err, tmp_path, "too long")
    assert "not writable" not in err


def corrupt_and_relist(folder: Path, rel: str, data: bytes) -> None:
    (folder / rel).write_bytes(data)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = file_table(folder)  # hashes match: only the content is wrong
    path.write_text(json.dumps(manifest))


def test_a_truncated_text_encoder_is_an_error(engines_copy, tmp_path, capsys):
    rel = "text_encoder/model.safetensors"
    corrupt_and_relist(engines_copy, rel, (engines_copy / rel).read_bytes()[:5000])
    code, err = run_cli(capsys, "--engines", engines_copy, "--prompt", PROMPT, "--out", tmp_path / "o.mp4")
    assert_refused(code, err, tmp_path, "pipeline components", "re-export")


def test_a_malformed_tokenizer_json_is_an_error_naming_the_folder(engines_copy, tmp_path, capsys):
    corrupt_and_relist(engines_copy, "tokenizer/tokenizer.json", b'{"version": "1.0", "model": {}}')
    code, err = run_cli(capsys, "--engines", engines_copy, "--prompt", PROMPT, "--out", tmp_path / "o.mp4")
    assert_refused(code, err, tmp_path, "pipeline components", str(engines_copy.resolve()))


def test_interrupt_before_the_outputs_are_written_writes_none(engines_dir, tmp_path, capsys, monkeypatch):
    def interrupted(args, outputs):
        outputs.add(args.out, lambda p: Path(p).write_bytes(b"video"))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.mp4")
    assert code == 130 and "no output was written" in err
    assert list(tmp_path.iterdir()) == []


def test_interrupt_after_the_outputs_are_written_says_so(engines_dir, tmp_path, capsys, monkeypatch):
    def interrupted(args, outputs):
        outputs.add(args.out, lambda p: Path(p).write_bytes(b"video"))
        outputs.add(args.stats, lambda p: Path(p).write_text("{}"))
        outputs.commit()
        raise KeyboardInterrupt  # e.g. Ctrl-C while the summary prints

    monkeypatch.setattr(cli, "run", interrupted)
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.mp4",
                        "--stats", tmp_path / "s.json")
    assert code == 130 and "after the outputs were written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4", "s.json"]


def test_a_failure_after_the_video_leaves_no_output_at_all(engines_dir, tmp_path, capsys, monkeypatch):
    """Video, frames, heatmap and stats appear together or not at all."""
    import runtime.heatmap as heatmap

    def broken(*args, **kwargs):
        raise cli.ForesightError("heatmap failed")

    monkeypatch.setattr(heatmap, "plot_reuse_heatmap", broken)
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "o.gif",
                        "--steps", 2, "--stats", tmp_path / "s.json", "--heatmap", tmp_path / "h.png",
                        "--save-frames", tmp_path / "f.npy", "--quiet")
    assert code == 2 and "heatmap failed" in err
    assert list(tmp_path.iterdir()) == []


def test_replay_follows_a_saved_stats_file_and_refuses_mismatches(engines_dir, tmp_path, capsys):
    first, again = tmp_path / "a.json", tmp_path / "b.json"
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "a.gif",
                        "--steps", 14, "--warmup", 4, "--recalculate", 3, "--stats", first, "--quiet")
    assert code == 0, err
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", "a blue circle moving up on a black background",
                        "--out", tmp_path / "b.gif", "--policy", "replay", "--trace", first, "--stats", again,
                        "--quiet")
    assert code == 0, err
    steps = [json.loads(p.read_text())["trace"]["steps"] for p in (first, again)]
    assert [s["computed"] for s in steps[0]] == [s["computed"] for s in steps[1]]
    assert any(len(s["computed"]) < len(steps[0][0]["computed"]) for s in steps[0])  # reuse was replayed
    replay = ["--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "c.gif", "--policy", "replay"]
    for extra, words in ((["--trace", first, "--steps", 10], ["14 steps", "--steps 14"]), ([], ["--trace"])):
        code, err = run_cli(capsys, *replay, *extra)
        assert code == 2 and "error:" in err and "Traceback" not in err, err
        assert all(w in err for w in words), err
    code, err = run_cli(capsys, "--engines", engines_dir, "--prompt", PROMPT, "--out", tmp_path / "c.gif",
                        "--policy", "replay", "--trace", tmp_path / "a.gif")
    assert code == 2 and "not a readable decision trace" in err
    assert not (tmp_path / "c.gif").exists()
