"""Quality metrics for generated videos: uint8 frames in, one number out (PSNR, SSIM).

Only numpy: benchmarks and tests compare frames already on the host. Frames are uint8
``(..., H, W, 3)``; a float video in [0, 1] must be converted first (``(x * 255).round()``),
since the metric's data range is that of uint8.
"""

from __future__ import annotations

import math

import numpy as np

MAX_VALUE = 255.0  # uint8 data range


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (got {a.dtype} and {b.dtype}); convert floats in [0, 1] with "
            "(x * 255).round().astype(np.uint8)"
        )
    if a.shape != b.shape:
        raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}; compare videos of the same size and length")
    if a.size == 0:
        raise ValueError("frames are empty: nothing to compare")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of two uint8 arrays; ``inf`` when equal."""
    a, b = _check_pair(a, b)
    mse = float(np.mean(np.square(a.astype(np.float64) - b.astype(np.float64))))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(MAX_VALUE**2 / mse)


# SSIM (Wang, Bovik, Sheikh, Simoncelli 2004): the paper's constants and 11x11 Gaussian window.
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D Gaussian filter of (N, H, W) over its last two axes, 'valid' region only
    (as the paper's reference code, filter2(..., 'valid')): (N, H-k+1, W-k+1)."""
    win = np.lib.stride_tricks.sliding_window_view
    x = win(x, g.size, axis=1) @ g  # (N, H-k+1, W)
    return win(x, g.size, axis=2) @ g  # (N, H-k+1, W-k+1)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two uint8 images ``(H, W, 3)`` or videos ``(F, H, W, 3)``; 1.0 when equal.

    Computed per frame and per RGB channel with an 11x11 Gaussian window (sigma 1.5) over the
    windows that fit inside the frame (no padding), K1=0.01, K2=0.03, L=255; the mean of all
    windows of all channels and frames. Frames need H, W >= 11.
    """
    a, b = _check_pair(a, b)
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"ssim takes (H, W, 3) images or (F, H, W, 3) videos (got shape {a.shape})")
    h, w = a.shape[-3:-1]
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"frames of {h}x{w} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} SSIM window; "
                         f"compare frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels")
    # (..., H, W, 3) -> (N, H, W): one plane per frame and channel
    x = np.moveaxis(a.reshape(-1, h, w, 3), -1, 1).reshape(-1, h, w).astype(np.float64)
    y = np.moveaxis(b.reshape(-1, h, w, 3), -1, 1).reshape(-1, h, w).astype(np.float64)
    g = _gaussian_window()
    c1, c2 = (SSIM_K1 * MAX_VALUE) ** 2, (SSIM_K2 * MAX_VALUE) ** 2
    mx, my = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mx * mx
    syy = _filter_valid(y * y, g) - my * my
    sxy = _filter_valid(x * y, g) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(ssim_map.mean())
