import errno
import os
import pathlib

import imageio.v3 as iio
import numpy as np
import pytest

from runtime import outputs
from runtime.errors import ForesightError, OutputPathError
from runtime.outputs import OutputSet, is_temp_name
from runtime.video import atomic_write, check_output_path, save_frames, write_video


def smooth_clip(frames=6, height=64, width=64) -> np.ndarray:
    """A moving colour gradient: smooth, so lossy codecs reproduce it closely."""
    f, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    r = 128 + 100 * np.sin(2 * np.pi * (x / width + f / frames))
    g = 128 + 100 * np.cos(2 * np.pi * (y / height))
    b = 60 + 150 * (x + y) / (height + width)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)  # (F, H, W, 3)


def leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refuse_temp_files(monkeypatch, error: OSError) -> None:
    """Make creating a temporary (or probe) file fail with ``error``, as a mount or permission would."""
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if is_temp_name(os.path.basename(path)):
            raise error
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "open", refuse)


@pytest.mark.parametrize("height,width", [(64, 64), (36, 52)])
def test_mp4_round_trip(tmp_path, height, width):
    clip = smooth_clip(6, height, width)
    out = write_video(clip, tmp_path / "out.mp4", fps=8)
    assert out == (tmp_path / "out.mp4").resolve()
    back = np.stack(list(iio.imiter(out, plugin="FFMPEG")))  # (F, H, W, 3)
    assert back.shape == clip.shape
    assert np.abs(back.astype(np.int16) - clip).mean() < 4
    assert leftovers(tmp_path) == ["out.mp4"]


def test_mp4_odd_size_is_padded_by_one_pixel(tmp_path):
    clip = smooth_clip(3, 35, 51)
    out = write_video(clip, tmp_path / "odd.mp4")
    back = np.stack(list(iio.imiter(out, plugin="FFMPEG")))
    assert back.shape == (3, 36, 52, 3)
    assert np.abs(back[:, :35, :51].astype(np.int16) - clip).mean() < 4


def test_gif_round_trip(tmp_path):
    clip = smooth_clip(5, 40, 48)
    out = write_video(clip, tmp_path / "out.GIF", fps=10)
    back = iio.imread(out, index=None, plugin="pillow", mode="RGB")  # (F, H, W, 3)
    assert back.shape == clip.shape
    # GIF quantises to a 256-colour palette: close, not exact.
    assert np.abs(back.astype(np.int16) - clip).mean() < 8
    meta = iio.immeta(out, index=0, plugin="pillow")
    assert meta["duration"] == 100
    assert meta["loop"] == 0


def test_unknown_extension_names_supported_ones(tmp_path):
    with pytest.raises(OutputPathError, match=r"\.mp4, \.gif"):
        write_video(smooth_clip(2, 8, 8), tmp_path / "out.avi")
    assert leftovers(tmp_path) == []


def test_missing_parent_folder(tmp_path):
    target = tmp_path / "missing" / "out.mp4"
    with pytest.raises(OutputPathError, match="create it first or choose another --out"):
        check_output_path(target)
    with pytest.raises(OutputPathError):
        write_video(smooth_clip(2, 8, 8), target)
    assert not (tmp_path / "missing").exists()
    assert leftovers(tmp_path) == []


def test_parent_is_a_regular_file(tmp_path):
    # Fails for root too, unlike a chmod-ed folder.
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        write_video(smooth_clip(2, 8, 8), tmp_path / "afile" / "out.mp4")


def test_path_is_a_directory(tmp_path):
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_path(tmp_path)


def test_not_writable_by_access_check(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.os, "access", lambda *args, **kwargs: False)
    with pytest.raises(OutputPathError, match="not writable"):
        check_output_path(tmp_path / "out.mp4")


def test_not_writable_by_probe(tmp_path, monkeypatch):
    # What a read-only mount does to root: os.access says yes, creating a file says no.
    refuse_temp_files(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(OutputPathError, match="not writable"):
        check_output_path(tmp_path / "out.mp4")
    assert leftovers(tmp_path) == []


def test_read_only_file_system(tmp_path, monkeypatch):
    refuse_temp_files(monkeypatch, OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(OutputPathError, match="is on a read-only file system; choose a folder on a writable one"):
        check_output_path(tmp_path / "out.mp4")


def test_long_name_is_too_long_not_unwritable(tmp_path):
    # 255 bytes minus ".", ".tmp-", a 7-digit pid, "-", 8 hex digits and the ".mp4" kept at the end.
    allowed = 255 - 26
    too_long = rf"too long \(240 bytes\): at most {allowed} characters.*choose a shorter name"
    with pytest.raises(OutputPathError, match=too_long):
        check_output_path(tmp_path / ("a" * 236 + ".mp4"))
    with pytest.raises(OutputPathError, match=f"at most {allowed} characters"):
        write_video(smooth_clip(2, 8, 8), tmp_path / ("a" * (allowed - 3) + ".mp4"))
    longest = "a" * (allowed - 4) + ".mp4"
    write_video(smooth_clip(2, 8, 8), tmp_path / longest)
    assert leftovers(tmp_path) == [longest]


def test_output_inside_engines_folder_refused(tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "manifest.json").write_text("{}")
    (tmp_path / "link").symlink_to(engines)
    for target in (engines / "manifest.json", tmp_path / "link" / "manifest.json", engines / "sub" / "x.png", engines):
        with pytest.raises(OutputPathError, match=rf"is inside the engines folder {engines}: write outputs elsewhere"):
            check_output_path(target, engines=tmp_path / "link")
    assert check_output_path(tmp_path / "engines.mp4", engines=engines) == tmp_path / "engines.mp4"
    assert (engines / "manifest.json").read_text() == "{}"


def test_write_video_staged_in_output_set(tmp_path):
    with OutputSet() as staged:
        out = write_video(smooth_clip(2, 8, 8), tmp_path / "out.gif", outputs=staged)
        frames = save_frames(smooth_clip(2, 8, 8), tmp_path / "frames.npy", outputs=staged)
        assert not out.exists() and not frames.exists()
    assert leftovers(tmp_path) == ["frames.npy", "out.gif"]


def test_failing_write_leaves_nothing(tmp_path):
    seen = []

    def write_half_then_fail(tmp):
        seen.append(tmp)
        assert tmp.parent == tmp_path and tmp.suffix == ".mp4"
        tmp.write_bytes(b"half a video")
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        atomic_write(tmp_path / "out.mp4", write_half_then_fail)
    assert len(seen) == 1
    assert leftovers(tmp_path) == []


def test_failing_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous")

    def fail(tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == ["out.mp4"]


def test_atomic_write_gives_umask_mode(tmp_path):
    out = atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"ok"))
    umask = os.umask(0)
    os.umask(umask)
    assert out.read_bytes() == b"ok"
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "frames",
    [
        smooth_clip(2, 8, 8).astype(np.float32),
        smooth_clip(2, 8, 8)[0],  # (H, W, 3): no frame axis
        np.zeros((2, 8, 8, 4), np.uint8),  # RGBA
        np.zeros((0, 8, 8, 3), np.uint8),
        [[[[0, 0, 0]]]],
    ],
    ids=["float", "3d", "rgba", "empty", "list"],
)
def test_bad_frames_rejected(tmp_path, frames):
    with pytest.raises(ForesightError) as info:
        write_video(frames, tmp_path / "out.mp4")
    assert isinstance(info.value, ValueError)
    assert leftovers(tmp_path) == []


def test_bad_fps_rejected(tmp_path):
    with pytest.raises(ForesightError, match="fps"):
        write_video(smooth_clip(2, 8, 8), tmp_path / "out.gif", fps=0)


def test_save_frames_round_trip(tmp_path):
    clip = smooth_clip(3, 8, 8)
    out = save_frames(clip, tmp_path / "frames.npy")
    np.testing.assert_array_equal(np.load(out), clip)
    assert leftovers(tmp_path) == ["frames.npy"]


def test_save_frames_writes_exactly_the_given_name(tmp_path):
    out = save_frames(np.arange(4), tmp_path / "frames.raw")
    assert leftovers(tmp_path) == ["frames.raw"]
    np.testing.assert_array_equal(np.load(out), np.arange(4))
