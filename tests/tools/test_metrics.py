import math

import numpy as np
import pytest

from tools.metrics import psnr, ssim


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


# ------------------------------------------------------------------ SSIM
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def textured(shape=(2, 16, 20, 3), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(30, 226, size=shape, dtype=np.uint8)


def test_ssim_identical_is_one():
    a = textured()
    assert ssim(a, a.copy()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a[0], a[0].copy()) == pytest.approx(1.0, abs=1e-12)  # one (H, W, 3) image


def test_ssim_of_a_constant_shift_is_the_luminance_term():
    # Flat frames: no variance, so the structure term is C2 / C2 = 1 and SSIM is
    # (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) exactly.
    a, b = video(100, (2, 16, 16, 3)), video(110, (2, 16, 16, 3))
    expected = (2 * 100 * 110 + C1) / (100**2 + 110**2 + C1)  # 0.99548
    assert ssim(a, b) == pytest.approx(expected, abs=1e-9)
    assert ssim(b, a) == pytest.approx(expected, abs=1e-9)


def test_ssim_of_texture_against_its_flat_mean_is_low():
    # Structure lost entirely: covariance 0, so each window scores about C2 / (var + C2) << 1.
    a = textured()
    flat = np.full_like(a, int(round(a.mean())))
    assert ssim(a, flat) < 0.05


def test_ssim_falls_monotonically_with_noise():
    a = textured(seed=1)
    noise = np.random.default_rng(2).normal(size=a.shape)
    scores = [ssim(a, np.clip(a + sigma * noise, 0, 255).round().astype(np.uint8)) for sigma in (0, 2, 5, 10, 20, 40)]
    assert scores[0] == pytest.approx(1.0)
    assert all(x > y for x, y in zip(scores, scores[1:])), scores
    assert scores[-1] < 0.9


def test_ssim_averages_frames():
    a = textured((2, 16, 16, 3))
    b = a.copy()
    b[1] = 255 - b[1]  # only frame 1 differs
    assert ssim(a, b) == pytest.approx((1.0 + ssim(a[1], b[1])) / 2, abs=1e-12)


def test_ssim_shape_mismatch_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        ssim(textured((2, 16, 16, 3)), textured((3, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"\* 255"):
        ssim(textured().astype(np.float32), textured())
    with pytest.raises(ValueError, match="11x11"):
        ssim(video(0, (2, 8, 8, 3)), video(0, (2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ssim(video(0, (16, 16)), video(0, (16, 16)))
