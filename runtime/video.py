"""Writing generated frames to disk: video files, raw frames, and the atomic write under both.

Every output goes through :func:`atomic_write`, so an interrupted or failed run never
leaves a half-written file where the user asked for one. The CLI calls
:func:`check_output_path` before loading any engine, so a typo in ``--out`` costs
milliseconds, not a generation.

Formats are picked by extension:

* ``.mp4``: H.264 (libx264), ``yuv420p``, CRF 15 through imageio's ffmpeg plugin.
  ``yuv420p`` halves the chroma resolution, so H.264 needs an even width and height.
  Odd sizes are padded by repeating the last row/column (one pixel at most), which keeps
  every generated pixel and the aspect ratio; ffmpeg's scaler is never used, so even
  sizes (64x64, 36x52, 480x832 ...) come out exactly the size they went in.
* ``.gif``: Pillow, looping forever, ``1000 / fps`` ms per frame (GIF stores
  centiseconds, so 8 fps is written as 120 or 130 ms). Pillow merges consecutive
  identical frames into one longer frame; playback time is unchanged.

Raw frames (``--save-frames frames.npy``) are written by :func:`save_frames`.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable

import numpy as np

from runtime.errors import ForesightError, OutputPathError

VIDEO_SUFFIXES = (".mp4", ".gif")
_MP4_QUALITY = 7  # imageio-ffmpeg maps quality q to CRF int((1 - q/10) * 51): 7 -> CRF 15.


class FramesError(ForesightError, ValueError):
    """Frames handed to a writer are not a uint8 (F, H, W, 3) array."""


def check_output_path(path, suffixes: Iterable[str] | None = None) -> pathlib.Path:
    """Resolve ``path`` and prove a file can be created there, before any expensive work.

    Raises OutputPathError when the path is a directory, its parent folder is missing or
    not a folder, the folder is not writable (checked with ``os.access`` and by actually
    creating and removing a probe file, which also catches root on read-only mounts),
    or, when ``suffixes`` is given, the extension is not one of them (case-insensitive).
    """
    path = pathlib.Path(path).expanduser().resolve()
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
    not_writable = f"folder {parent} is not writable; fix its permissions or choose another --out"
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(not_writable)
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.probe-")
    except OSError as e:
        raise OutputPathError(f"{not_writable} ({e.strerror})") from e
    os.close(fd)
    os.unlink(probe)
    return path


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; give the final file the mode open() would have.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write_fn: Callable[[pathlib.Path], object]) -> pathlib.Path:
    """Call ``write_fn(tmp_path)`` on a temporary file beside ``path``, then move it into place.

    The temporary file keeps ``path``'s suffix (``.out.mp4.tmp-XXXX.mp4``) so writers that
    pick a format by extension work. It is fsynced and ``os.replace``d over ``path``; on any
    exception (KeyboardInterrupt included) it is removed and the exception re-raised, so
    ``path`` is either the complete new file or untouched. Returns the resolved path.
    """
    path = pathlib.Path(path).expanduser().resolve()
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
    except OSError as e:
        raise OutputPathError(f"cannot create a file in {path.parent} ({e.strerror}); choose another --out") from e
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # Make the rename itself durable; not every filesystem lets a folder be fsynced.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _check_frames(frames) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise FramesError(f"frames must be a numpy array, got {type(frames).__name__}; pass np.asarray(frames)")
    if frames.dtype != np.uint8:
        raise FramesError(
            f"frames must be uint8, got {frames.dtype}; convert floats in [0, 1] with "
            "(np.clip(x, 0, 1) * 255).round().astype(np.uint8)"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise FramesError(
            f"frames must have shape (F, H, W, 3) with F, H, W >= 1, got {frames.shape}; "
            "move channels last and drop the batch axis"
        )
    return np.ascontiguousarray(frames)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    _, h, w, _ = frames.shape  # (F, H, W, 3)
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4(frames: np.ndarray, tmp: pathlib.Path, fps: float) -> None:
    import imageio.v2 as iio

    # macro_block_size=1 stops imageio rescaling to multiples of 16; _pad_to_even already
    # satisfied the only hard requirement of yuv420p.
    with iio.get_writer(
        tmp,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        quality=_MP4_QUALITY,
        macro_block_size=1,
    ) as writer:
        for frame in _pad_to_even(frames):
            writer.append_data(frame)


def _write_gif(frames: np.ndarray, tmp: pathlib.Path, fps: float) -> None:
    import imageio.v3 as iio

    iio.imwrite(tmp, frames, extension=".gif", plugin="pillow", duration=1000.0 / fps, loop=0)


def write_video(frames: np.ndarray, path, fps: float = 8) -> pathlib.Path:
    """Write uint8 ``frames`` of shape (F, H, W, 3) as a ``.mp4`` or ``.gif`` at ``path``.

    The format follows the extension (see the module docstring for codec details and the
    odd-size padding of mp4). Written atomically; returns the resolved path.
    """
    path = check_output_path(path, VIDEO_SUFFIXES)
    frames = _check_frames(frames)
    if not fps > 0:
        raise FramesError(f"fps must be positive, got {fps}; pass e.g. fps=8")
    writer = {".mp4": _write_mp4, ".gif": _write_gif}[path.suffix.lower()]
    return atomic_write(path, lambda tmp: writer(frames, tmp, fps))


def save_frames(frames: np.ndarray, path) -> pathlib.Path:
    """Save ``frames`` losslessly with ``np.save`` (for ``--save-frames frames.npy``), atomically.

    The file is written exactly at ``path``; ``np.save`` does not append ``.npy`` here.
    """
    path = check_output_path(path)
    frames = np.asarray(frames)

    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, frames, allow_pickle=False)

    return atomic_write(path, write)
