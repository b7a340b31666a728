import math

import numpy as np
import pytest

from tools.metrics import psnr


def video(value: int, shape=(2, 4, 4, 3)) -> np.ndarray:
    return np.full(shape, value, dtype=np.uint8)


def test_constant_offset_of_one_is_48_13_db():
    # mse = 1 -> 10 * log10(255^2) = 48.1308 dB
    assert psnr(video(100), video(101)) == pytest.approx(48.1308, abs=1e-4)


def test_full_range_difference_is_0_db():
    assert psnr(video(0), video(255)) == pytest.approx(0.0, abs=1e-12)


def test_known_mse_on_part_of_the_pixels():
    a = video(10, shape=(4,))
    b = a.copy()
    b[0] = 30  # one pixel off by 20 of four: mse = 400 / 4 = 100
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))


def test_no_uint8_wraparound():
    # 0 - 255 in uint8 arithmetic would wrap to 1; the metric must see 255.
    assert psnr(video(0), video(255)) == psnr(video(255), video(0))


def test_identical_is_inf():
    a = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    assert psnr(a, a.copy()) == math.inf


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        psnr(video(0, (2, 4, 4, 3)), video(0, (3, 4, 4, 3)))


def test_float_frames_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"\* 255"):
        psnr(video(0).astype(np.float32), video(0))
