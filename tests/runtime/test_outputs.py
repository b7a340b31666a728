import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from runtime import outputs
from runtime.errors import ForesightError, OutputPathError
from runtime.outputs import (
    OutputSet,
    Terminated,
    check_distinct,
    clean_stale,
    is_temp_name,
    replace_dir,
    temp_dir,
    terminate_as_interrupt,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and pids")


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped (reuse within the test is vanishingly rare)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_outputs_appear_together(tmp_path):
    with OutputSet() as staged:
        a = staged.add(tmp_path / "a.json", lambda tmp: tmp.write_text("a"))
        b = staged.add(tmp_path / "b.txt", lambda tmp: tmp.write_text("b"))
        assert not a.exists() and not b.exists()
        assert not staged.committed
    assert staged.committed
    assert (a.read_text(), b.read_text()) == ("a", "b")
    assert leftovers(tmp_path) == ["a.json", "b.txt"]
    assert a.stat().st_mode & 0o777 == 0o666 & ~umask()


def test_failure_before_commit_touches_no_output(tmp_path):
    (tmp_path / "a.json").write_text("previous")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("encoder died")

    staged = OutputSet()
    with pytest.raises(RuntimeError, match="encoder died"), staged:
        staged.add(tmp_path / "a.json", lambda tmp: tmp.write_text("new"))
        staged.add(tmp_path / "b.mp4", fail)
    assert not staged.committed
    assert leftovers(tmp_path) == ["a.json"]
    assert (tmp_path / "a.json").read_text() == "previous"


def test_interrupt_in_the_block_writes_nothing(tmp_path):
    staged = OutputSet()
    with pytest.raises(KeyboardInterrupt), staged:
        staged.add(tmp_path / "a.json", lambda tmp: tmp.write_text("a"))
        raise KeyboardInterrupt
    assert not staged.committed
    assert leftovers(tmp_path) == []


def test_temp_names_carry_pid_and_suffix(tmp_path):
    seen = []
    with OutputSet() as staged:
        staged.add(tmp_path / "out.mp4", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    assert re.fullmatch(rf"\.out\.mp4\.tmp-{os.getpid()}-[0-9a-f]{{8}}\.mp4", seen[0])
    assert is_temp_name(seen[0])


COMMIT_SIGNAL_SCRIPT = """
import os, signal, sys
from runtime import outputs
from runtime.outputs import OutputSet, terminate_as_interrupt

folder, signum, ignored = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "ignored"
# A child inherits its parent's blocked and ignored signals (a test runner started in the background
# ignores SIGINT): start as a shell-started CLI does, with both unblocked and at their defaults.
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT, signal.SIGTERM])
signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
real_replace, calls = os.replace, []

def replace_and_signal(src, dst):
    if not calls:
        signal.raise_signal(signum)
        print("after the signal: pending", sorted(signal.sigpending()), "blocked",
              sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), "handler", signal.getsignal(signum), file=sys.stderr)
    calls.append(dst)
    real_replace(src, dst)

outputs.os.replace = replace_and_signal
staged = OutputSet()
try:
    with terminate_as_interrupt(), staged:
        for name in ("a.mp4", "b.npy", "c.json"):
            staged.add(os.path.join(folder, name), lambda tmp: tmp.write_text("x"))
    print("no interrupt", len(calls), staged.committed)
except KeyboardInterrupt:
    print("interrupted", len(calls), staged.committed)
"""


def run_commit_signal(folder, signum, ignored=False):
    child = subprocess.run([sys.executable, "-c", COMMIT_SIGNAL_SCRIPT, str(folder), str(int(signum)),
                            "ignored" if ignored else "handled"], cwd=REPO, capture_output=True, text=True, timeout=60)
    return child.stdout.strip(), child.stderr


@posix_only
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_commit_lands_after_the_last_rename(tmp_path, signum):
    # In a fresh interpreter: a signal raised here would otherwise meet whatever the test runner's process
    # blocks or ignores (an ignored SIGINT made this test fail when the suite ran in the background).
    out, err = run_commit_signal(tmp_path, signum)
    assert out == "interrupted 3 True", err
    assert leftovers(tmp_path) == ["a.mp4", "b.npy", "c.json"]


@posix_only
def test_an_ignored_sigint_stays_ignored_through_the_commit(tmp_path):
    # Held back during the commit and raised again after it: a process that ignores SIGINT still ignores it.
    out, err = run_commit_signal(tmp_path, signal.SIGINT, ignored=True)
    assert out == "no interrupt 3 True", err
    assert leftovers(tmp_path) == ["a.mp4", "b.npy", "c.json"]


def test_same_path_twice_refused(tmp_path):
    with pytest.raises(OutputPathError, match="two outputs"), OutputSet() as staged:
        staged.add(tmp_path / "a.json", lambda tmp: tmp.write_text("a"))
        staged.add(tmp_path / "." / "a.json", lambda tmp: tmp.write_text("b"))
    assert leftovers(tmp_path) == []


def test_check_distinct(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path)
    check_distinct({"--out": tmp_path / "a.mp4", "--stats": tmp_path / "a.json", "--heatmap": None})
    with pytest.raises(OutputPathError, match=r"--out and --stats both write .*a\.mp4: give each output its own file"):
        check_distinct({"--out": tmp_path / "a.mp4", "--heatmap": None, "--stats": tmp_path / "link" / "a.mp4"})


@posix_only
def test_clean_stale_removes_only_dead_runs_temporaries(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    stale = [f".out.mp4.tmp-{dead}-0123abcd.mp4", f".out.mp4.tmp-{dead}-89abcdef"]
    kept = [
        f".out.mp4.tmp-{alive}-0123abcd.mp4",  # a concurrent run (here: this process)
        ".out.mp4.tmp-k3j2h1g0.mp4",  # no pid: made by an older version, liveness unknown
        f"out.mp4.tmp-{dead}-0123abcd.mp4",  # not hidden: not ours
        f".out.mp4.tmp-{dead}-0123abcd.mp4.bak",
        f".other.mp4.tmp-{dead}-0123abcd.mp4",  # another output's
        f".out.mp4.tmp-{dead}-0123ABCD.mp4",
        "out.mp4",
    ]
    for name in stale[:1] + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / stale[1]).mkdir()
    (tmp_path / stale[1] / "inner").write_text("x")
    removed = clean_stale(tmp_path / "out.mp4")
    assert sorted(p.name for p in removed) == sorted(stale)
    assert leftovers(tmp_path) == sorted(kept)


@posix_only
def test_clean_stale_old_folder_removed_or_put_back(tmp_path):
    engines = tmp_path / "engines"
    old = tmp_path / f".engines.old-{dead_pid()}"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    # The replace was killed between its renames: the moved-aside folder is the only copy.
    assert clean_stale(engines) == []
    assert (engines / "manifest.json").read_text() == "old"
    old.mkdir()
    assert clean_stale(engines) == [old]
    assert leftovers(tmp_path) == ["engines"]


@posix_only
def test_temp_dir_and_replace_dir(tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    tmp = temp_dir(out)
    assert tmp.parent == tmp_path
    assert re.fullmatch(rf"\.engines\.tmp-{os.getpid()}-[0-9a-f]{{8}}", tmp.name)
    assert is_temp_name(tmp.name)
    assert tmp.stat().st_mode & 0o777 == 0o777 & ~umask()
    (tmp / "manifest.json").write_text("new")
    replace_dir(tmp, out)
    assert (out / "manifest.json").read_text() == "new"
    assert leftovers(tmp_path) == ["engines"]


def test_temp_dir_read_only_file_system(tmp_path, monkeypatch):
    # Root on a read-only mount: os.access says yes, mkdir says EROFS.
    def refuse(path, mode=0o777):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(outputs.os, "mkdir", refuse)
    with pytest.raises(OutputPathError, match="read-only file system; choose a folder on a writable one") as info:
        temp_dir(tmp_path / "engines")
    assert isinstance(info.value, ForesightError)


@pytest.mark.parametrize("name,expected", [
    (".latte-tiny.tmp-1234-0123abcd", True),
    (".out.mp4.tmp-1234-0123abcd.mp4", True),
    (".latte-tiny.old-1234", True),
    ("latte-tiny", False),
    (".latte-tiny.tmp-k3j2h1g0", False),
    (".latte-tiny.tmp-0-0123abcd", False),
    (".latte-tiny.old-12x", False),
    ("latte-tiny.tmp-1234-0123abcd", False),
])
def test_is_temp_name(name, expected):
    assert is_temp_name(name) is expected


@posix_only
def test_terminate_as_interrupt_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_as_interrupt():
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Terminated, KeyboardInterrupt)


# Stages an output whose writer blocks, after saying so on stdout.
STAGING_SCRIPT = textwrap.dedent("""
    import contextlib, sys, time
    from runtime.outputs import OutputSet, Terminated, terminate_as_interrupt

    def write(tmp):
        tmp.write_bytes(b"half a video")
        print(tmp.name, flush=True)
        time.sleep(60)

    try:
        with {guard}, OutputSet() as outputs:
            outputs.add(sys.argv[1], write)
    except Terminated:
        sys.exit(143)
""")


def run_staging(tmp_path, guard: str, signum) -> tuple[subprocess.Popen, str]:
    script = STAGING_SCRIPT.format(guard=guard)
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out.mp4")],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    tmp_name = child.stdout.readline().strip()
    assert (tmp_path / tmp_name).exists()
    child.send_signal(signum)
    child.wait(timeout=30)
    child.stdout.close()
    return child, tmp_name


@posix_only
def test_sigterm_runs_cleanup(tmp_path):
    child, tmp_name = run_staging(tmp_path, "terminate_as_interrupt()", signal.SIGTERM)
    assert child.returncode == 143
    assert tmp_name.startswith(f".out.mp4.tmp-{child.pid}-")
    assert leftovers(tmp_path) == []


@posix_only
def test_sigkill_leftover_removed_by_the_next_run(tmp_path):
    child, tmp_name = run_staging(tmp_path, "contextlib.nullcontext()", signal.SIGKILL)
    assert child.returncode == -signal.SIGKILL
    assert leftovers(tmp_path) == [tmp_name]
    with OutputSet() as staged:  # Adding the same output sweeps the dead run's temporary first.
        staged.add(tmp_path / "out.mp4", lambda tmp: tmp.write_bytes(b"video"))
    assert leftovers(tmp_path) == ["out.mp4"]


def test_staged_dir_replaces_the_folder_whole_or_not_at_all(tmp_path):
    from runtime.outputs import staged_dir

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("failed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (out / "old.txt").exists()
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
