"""Does a heat map point at the defect? The pointing game and the heat inside a mask.

Numpy only. The pointing game (Zhang et al., "Top-down neural attention by excitation
backprop", 2016) counts a heat map as a hit when its maximum lies on the object, widened by a
few pixels of tolerance, since a coarse feature map cannot place a peak on a 2-pixel line.
The mass share says how much of the heat falls on the object itself: a uniform map scores
the object's share of the image area.

Example:
    >>> heat = np.zeros((8, 8)); heat[2, 5] = 1.0
    >>> mask = np.zeros((8, 8), bool); mask[2, 6] = True
    >>> pointing_hit(heat, mask, tolerance=1), pointing_hit(heat, mask, tolerance=0)
    (True, False)
"""

from __future__ import annotations

import numpy as np


def _check(heat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    heat, mask = np.asarray(heat, dtype=np.float64), np.asarray(mask, dtype=bool)
    if heat.ndim != 2 or heat.shape != mask.shape:
        raise ValueError(f"heat map and mask must be 2-D arrays of one shape, got {heat.shape} and {mask.shape}")
    if not np.isfinite(heat).all():
        raise ValueError("heat map holds NaN or infinite values")
    return heat, mask


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by every pixel within ``radius`` pixels (Euclidean, a disc)."""
    mask = np.asarray(mask, dtype=bool)
    if radius < 0:
        raise ValueError(f"radius must be >= 0 pixels, got {radius}")
    h, w = mask.shape
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if (dy or dx) and dy * dy + dx * dx <= radius * radius:
                out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] |= \
                    mask[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
    return out


def pointing_hit(heat: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool:
    """Whether the heat map's maximum lies within ``tolerance`` pixels of the mask.

    Where the maximum is reached at several pixels, all of them must be within tolerance, so a
    flat map (all zeros: Grad-CAM found no evidence) is a miss unless the mask covers the image.

    Raises:
        ValueError: the arrays differ in shape, are not 2-D, or the heat is not finite.
    """
    heat, mask = _check(heat, mask)
    if not mask.any():
        raise ValueError("the mask is empty: nothing to point at")
    peaks = heat >= heat.max()
    return bool(dilate(mask, tolerance)[peaks].all())


def mass_inside(heat: np.ndarray, mask: np.ndarray) -> float:
    """Share of the (non-negative) heat inside the mask; 0.0 for a map without heat."""
    heat, mask = _check(heat, mask)
    heat = np.clip(heat, 0.0, None)
    total = float(heat.sum())
    return float(heat[mask].sum()) / total if total > 0 else 0.0


def centre_map(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """A Gaussian centred on the image, ``sigma`` a share of each side: the centre-bias baseline."""
    h, w = shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2.0 * sigma**2))


def random_map(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Uniform noise: its maximum is a pixel drawn at random (the chance baseline)."""
    return rng.random(shape)
