"""Output files of one run: checked before the work, written together or not at all.

Every output is first written to a hidden temporary beside it, then renamed into place.
:class:`OutputSet` stages several such writes and renames them all at the end, with
SIGINT and SIGTERM held back meanwhile, so a run leaves either all of its outputs or none
(and any previous files untouched). Folders (the exporter's engines) follow the same
scheme through :func:`temp_dir` and :func:`replace_dir`.

Temporaries carry the pid of the process that made them::

    .{name}.tmp-{pid}-{8 hex}{suffix}    a file (suffix = the output's, so writers pick the format)
    .{name}.tmp-{pid}-{8 hex}            a folder from temp_dir, or a writability probe of a suffix-less name
    .{name}.old-{pid}                    an existing folder moved aside by replace_dir

so that :func:`clean_stale` can remove those of processes killed with SIGKILL (or
SIGTERM without :func:`terminate_as_interrupt`) and keep those of a run still going.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Mapping

from runtime.errors import OutputPathError

_RANDOM_HEX = 8
_PID_WIDTH = 7  # Linux's PID_MAX_LIMIT is 4194304; budget names for the longest pid.
# "." + name + ".tmp-" + pid + "-" + random, before the suffix.
_TEMP_OVERHEAD = 1 + len(".tmp-") + _PID_WIDTH + 1 + _RANDOM_HEX
_NAME_MAX = 255
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGINT", "SIGTERM") if hasattr(signal, s))
_TEMP_NAME = re.compile(r"\..+\.(?:tmp-[1-9][0-9]*-[0-9a-f]{%d}(?:\.[^.]+)?|old-[1-9][0-9]*)" % _RANDOM_HEX)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived inside :func:`terminate_as_interrupt` (exit status 143 by convention)."""


def is_temp_name(name: str) -> bool:
    """True if ``name`` is one of this module's temporary names (file, folder or moved-aside folder)."""
    return _TEMP_NAME.fullmatch(name) is not None


def _temp_path(path: pathlib.Path, suffix: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(_RANDOM_HEX // 2)}{suffix}")


def _old_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def _name_max(folder: pathlib.Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # No pathconf (Windows) or the filesystem won't say.
        return _NAME_MAX


def _too_long(path: pathlib.Path, name_max: int, suffix: str) -> OutputPathError:
    overhead = _TEMP_OVERHEAD + len(os.fsencode(suffix))
    name = path.name if len(path.name) <= 60 else f"{path.name[:30]}...{path.name[-20:]}"
    return OutputPathError(
        f"file name {name!r} in {path.parent} is too long ({len(os.fsencode(path.name))} bytes): at most "
        f"{name_max - overhead} characters (bytes in UTF-8) are allowed, {name_max} minus {overhead} for the "
        f"temporary file written beside it; choose a shorter name"
    )


def _cannot_create(path: pathlib.Path, suffix: str, e: OSError) -> OutputPathError:
    folder = path.parent
    if e.errno == errno.ENAMETOOLONG:
        return _too_long(path, _name_max(folder), suffix)
    if e.errno == errno.EROFS:
        return OutputPathError(f"folder {folder} is on a read-only file system; choose a folder on a writable one")
    if e.errno in (errno.EACCES, errno.EPERM):
        return OutputPathError(f"folder {folder} is not writable; fix its permissions or choose another --out")
    if e.errno == errno.ENOSPC:
        return OutputPathError(f"no space left on the device of {folder}; free some space or choose another --out")
    return OutputPathError(f"cannot create a file in {folder} ({e.strerror}); choose another --out")


def _create_temp(path: pathlib.Path, make: Callable[[pathlib.Path], object], suffix: str) -> pathlib.Path:
    while True:
        tmp = _temp_path(path, suffix)
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue  # 32 random bits collided; draw again.
        except OSError as e:
            raise _cannot_create(path, suffix, e) from e


def _make_file(tmp: pathlib.Path) -> None:
    # Mode 0666 is reduced by the umask, as open() would; writers that rewrite the file keep it.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def check_output_path(path, suffixes: Iterable[str] | None = None, engines=None) -> pathlib.Path:
    """Resolve ``path`` and prove a file can be created there, before any expensive work.

    Raises OutputPathError when the path is inside (or is) the folder ``engines`` (symlinks
    resolved: ``--stats E/manifest.json`` would overwrite the manifest), is a directory, its
    parent folder is missing or not a folder, its name is too long to leave room for the
    temporary name, the folder is not writable or on a read-only file system (checked with
    ``os.access`` and by creating and removing a probe file, which catches root on read-only
    mounts), or, when ``suffixes`` is given, the extension is not one of them (case-insensitive).
    """
    path = pathlib.Path(path).expanduser().resolve()
    if engines is not None:
        engines = pathlib.Path(engines).expanduser().resolve()
        if path == engines or engines in path.parents:
            raise OutputPathError(f"{path} is inside the engines folder {engines}: write outputs elsewhere")
    if path.is_dir():
        raise OutputPathError(f"{path} is a directory; give a file name such as {path / 'out.mp4'}")
    if suffixes is not None:
        suffixes = tuple(s.lower() for s in suffixes)
        if path.suffix.lower() not in suffixes:
            raise OutputPathError(
                f"{path}: unsupported extension {path.suffix or '(none)'!r}; "
                f"use one of {', '.join(suffixes)}"
            )
    parent = path.parent
    if not parent.exists():
        raise OutputPathError(f"folder {parent} does not exist; create it first or choose another --out")
    if not parent.is_dir():
        raise OutputPathError(f"{parent} is not a folder; choose another --out")
    name_max = _name_max(parent)
    if len(os.fsencode(path.name)) + _TEMP_OVERHEAD + len(os.fsencode(path.suffix)) > name_max:
        raise _too_long(path, name_max, path.suffix)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"folder {parent} is not writable; fix its permissions or choose another --out")
    # The probe has the temporaries' own name, so it proves they fit and clean_stale knows it.
    os.unlink(_create_temp(path, _make_file, path.suffix))
    return path


def check_distinct(outputs: Mapping[str, object]) -> None:
    """Refuse two outputs of one run that resolve to the same file.

    ``outputs`` maps a label (the option, e.g. ``"--stats"``) to a path; None values are skipped.
    """
    seen: dict[pathlib.Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        resolved = pathlib.Path(path).expanduser().resolve()
        if resolved in seen:
            raise OutputPathError(f"{seen[resolved]} and {label} both write {resolved}: give each output its own file")
        seen[resolved] = label


@contextlib.contextmanager
def _signals_held():
    """Defer SIGINT/SIGTERM to the end of the block, then deliver them as they would have been.

    In the main thread the handlers are swapped for recorders: masking this thread alone
    would not do, since the kernel hands a process-wide signal to any thread that does not
    block it (torch's pool threads) and Python then runs the handler here anyway. Elsewhere
    handlers cannot be set, so the signals are blocked for this thread where that exists.
    """
    if threading.current_thread() is not threading.main_thread():
        if not hasattr(signal, "pthread_sigmask"):
            yield
            return
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        return
    pending = []
    previous = {}
    for s in _SIGNALS:
        if signal.getsignal(s) is not None:  # None: set outside Python, could not be put back.
            previous[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in pending:
            signal.raise_signal(s)


def _fsync_dirs(folders: Iterable[pathlib.Path]) -> None:
    for folder in set(folders):
        try:  # Makes the renames durable; not every filesystem lets a folder be fsynced.
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


class OutputSet:
    """Outputs of one run, staged in temporaries and renamed into place together.

    ::

        with OutputSet() as outputs:
            outputs.add("out.mp4", write_mp4)   # write_mp4(tmp_path) writes the whole file
            outputs.add("stats.json", write_stats)
        # all renamed here; an exception in the block removes every temporary instead

    ``add`` writes now, into a temporary beside the target; no target is touched until
    ``commit`` (called on leaving the block without an exception, or explicitly), which
    renames them all with SIGINT/SIGTERM held back, so a Ctrl-C lands before the first
    rename or after the last. ``committed`` says which: False means nothing was written.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[pathlib.Path, pathlib.Path]] = []  # (temporary, target)
        self.committed = False

    def add(self, path, write_fn: Callable[[pathlib.Path], object]) -> pathlib.Path:
        """Stage ``write_fn(tmp_path)`` for ``path``; returns the resolved target (not yet written).

        The temporary keeps ``path``'s suffix, is fsynced after ``write_fn`` returns, and has
        mode 0666 & ~umask. Dead runs' temporaries for ``path`` are removed first (:func:`clean_stale`).
        If ``write_fn`` raises, its temporary is removed and the exception propagates.
        """
        if self.committed:
            raise RuntimeError("OutputSet already committed; start a new one")
        path = pathlib.Path(path).expanduser().resolve()
        if any(target == path for _, target in self._staged):
            raise OutputPathError(f"{path} is given for two outputs of this run: give each its own file")
        clean_stale(path)
        tmp = _create_temp(path, _make_file, path.suffix)
        try:
            write_fn(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._staged.append((tmp, path))
        return path

    def commit(self) -> list[pathlib.Path]:
        """Rename every staged temporary over its target; returns the targets.

        A rename fails only if a target changed meanwhile (became a folder, lost permissions);
        then the remaining temporaries are removed and OutputPathError says which outputs were
        written and which were not.
        """
        done: list[pathlib.Path] = []
        with _signals_held():
            try:
                for tmp, path in self._staged:
                    os.replace(tmp, path)
                    done.append(path)
            except OSError as e:
                self.discard()
                raise OutputPathError(
                    f"could not move the new {path.name} into place ({e.strerror}); "
                    f"written: {', '.join(map(str, done)) or 'nothing'}; check {path} and run again"
                ) from e
            self.committed = True  # Before any held-back signal is delivered.
            self._staged = []
        _fsync_dirs(path.parent for path in done)
        return done

    def discard(self) -> None:
        """Remove every staged temporary; targets stay as they were."""
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        else:
            self.discard()


def atomic_write(path, write_fn: Callable[[pathlib.Path], object], outputs: OutputSet | None = None) -> pathlib.Path:
    """Write one file through a temporary; returns the resolved path.

    ``path`` is either the complete new file or untouched, whatever exception (KeyboardInterrupt
    included) ``write_fn`` raises. With ``outputs``, the write is staged there instead
    (``outputs.add``) and the file appears when that set commits.
    """
    if outputs is not None:
        return outputs.add(path, write_fn)
    with OutputSet() as one:
        path = one.add(path, write_fn)
    return path


def temp_dir(out) -> pathlib.Path:
    """Create the temporary folder an export of ``out`` is written into: ``.{name}.tmp-{pid}-{hex}`` beside it.

    Its mode is 0777 & ~umask, as the finished folder's should be. Raises OutputPathError when
    it cannot be created (read-only file system, permissions, name too long), whatever
    ``os.access`` said. Move it into place with :func:`replace_dir`.
    """
    out = pathlib.Path(out).expanduser()
    return _create_temp(out, lambda tmp: os.mkdir(tmp, 0o777), "")


def replace_dir(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``; an existing ``out`` is moved aside
    (``.{name}.old-{pid}``) and removed after. SIGINT/SIGTERM are held between the renames,
    so only SIGKILL or a crash can leave ``out`` missing; :func:`clean_stale` then puts it back."""
    tmp, out = pathlib.Path(tmp), pathlib.Path(out)
    old = _old_path(out)
    with _signals_held():
        moved = out.exists()
        if moved:
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if moved:
                old.rename(out)
            raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out):
    """A temporary folder beside ``out`` (:func:`temp_dir`) to write a whole folder into: renamed
    over ``out`` (:func:`replace_dir`) when the block ends, removed if it raises (Ctrl-C included),
    so ``out`` is the complete new folder or the old one, never half of either."""
    out = pathlib.Path(out).expanduser()
    tmp = temp_dir(out)
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) terminates the process on Windows; never guess there.
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # Another user's process.
    return True


def clean_stale(path) -> list[pathlib.Path]:
    """Remove temporaries for ``path`` left by processes that no longer run; returns what was removed.

    Only names of this module's patterns for exactly ``path`` are considered, and only those
    whose pid is not a live process: a concurrent run keeps its own. A moved-aside
    ``.{name}.old-{pid}`` is removed when ``path`` exists, and renamed back to ``path`` when it
    does not (the replace was killed between its two renames). Removal errors are ignored.
    """
    path = pathlib.Path(path).expanduser()
    name, suffix = re.escape(path.name), re.escape(path.suffix)
    temp = re.compile(rf"\.{name}\.tmp-([1-9][0-9]*)-[0-9a-f]{{{_RANDOM_HEX}}}(?:{suffix})?")
    old = re.compile(rf"\.{name}\.old-([1-9][0-9]*)")
    try:
        entries = sorted(os.scandir(path.parent), key=lambda e: e.name)
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = temp.fullmatch(entry.name) or old.fullmatch(entry.name)
        if match is None or _alive(int(match[1])):
            continue
        stale = path.parent / entry.name
        try:
            if match.re is old and not os.path.lexists(path):
                stale.rename(path)
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError:
            continue
        removed.append(stale)
    return removed


@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread,
    so the cleanup that runs on Ctrl-C (``finally``, ``except BaseException``) runs on ``kill`` too.

    The previous handler is restored on exit. Call from the main thread (signal.signal's rule).
    """

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
