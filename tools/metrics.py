"""Quality metrics for generated videos: uint8 frames in, one number out.

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
