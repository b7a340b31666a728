"""Writing generated frames to disk: video files and raw frames.

Every output is written through a temporary file (:mod:`runtime.outputs`), so an
interrupted or failed run never leaves a half-written file where the user asked for one;
pass ``outputs=`` (an :class:`~runtime.outputs.OutputSet`) to have a file appear only
together with the run's other outputs. The CLI calls :func:`check_output_path` before
loading any engine, so a typo in ``--out`` costs milliseconds, not a generation.

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

import pathlib

import numpy as np

from runtime.errors import ForesightError
# atomic_write and check_output_path are imported from here by the CLI, heatmap and tools.
from runtime.outputs import OutputSet, atomic_write, check_output_path

VIDEO_SUFFIXES = (".mp4", ".gif")
_MP4_QUALITY = 7  # imageio-ffmpeg maps quality q to CRF int((1 - q/10) * 51): 7 -> CRF 15.


class FramesError(ForesightError, ValueError):
    """Frames handed to a writer are not a uint8 (F, H, W, 3) array."""


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


def write_video(frames: np.ndarray, path, fps: float = 8, outputs: OutputSet | None = None) -> pathlib.Path:
    """Write uint8 ``frames`` of shape (F, H, W, 3) as a ``.mp4`` or ``.gif`` at ``path``.

    The format follows the extension (see the module docstring for codec details and the
    odd-size padding of mp4). Written atomically, or staged in ``outputs`` (in place only
    once it commits); returns the resolved path.
    """
    path = check_output_path(path, VIDEO_SUFFIXES)
    frames = _check_frames(frames)
    if not fps > 0:
        raise FramesError(f"fps must be positive, got {fps}; pass e.g. fps=8")
    writer = {".mp4": _write_mp4, ".gif": _write_gif}[path.suffix.lower()]
    return atomic_write(path, lambda tmp: writer(frames, tmp, fps), outputs)


def save_frames(frames: np.ndarray, path, outputs: OutputSet | None = None) -> pathlib.Path:
    """Save ``frames`` losslessly with ``np.save`` (for ``--save-frames frames.npy``), atomically
    or staged in ``outputs``.

    The file is written exactly at ``path``; ``np.save`` does not append ``.npy`` here.
    """
    path = check_output_path(path)
    frames = np.asarray(frames)

    def write(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, frames, allow_pickle=False)

    return atomic_write(path, write, outputs)
