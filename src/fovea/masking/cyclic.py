"""Inverse block masks and Franca's CyclicMask (METHODS.md section 4).

An inverse block mask keeps one rectangle visible and masks everything else. Placed inside the grid,
the visible rectangle covers the centre far more often than the corners, so corners are masked far
more often (~84% vs ~3% at the centre). CyclicMask rolls the mask by a uniform 2-D offset with
wrap-around, which makes every position equally likely to be masked.
"""
from __future__ import annotations

import math

import numpy as np


def inverse_block_mask(h: int, w: int, ratio: float, rng: np.random.Generator,
                       ratio_range: tuple[float, float] | None = None, min_aspect: float = 0.3) -> np.ndarray:
    """Bool [h, w] mask whose unmasked (visible) cells form one rectangle of about ``(1 - ratio) h w`` cells.

    The rectangle has a log-uniform aspect ratio in (min_aspect, 1/min_aspect) and a uniform position
    inside the grid. Its sides are rounded to whole patches; when ``ratio_range`` is given, the sides are
    moved by up to two patches if needed so that the masked fraction stays within that range.
    """
    visible = max((1.0 - ratio) * h * w, 1.0)
    ar = math.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
    bh = int(min(max(round(math.sqrt(visible * ar)), 1), h))
    bw = int(min(max(round(visible / bh), 1), w))
    if ratio_range is not None:  # keep the masked fraction 1 - bh*bw/(h*w) inside [lo, hi]: nearest fitting sides
        lo, hi = ratio_range
        fits = [(abs(a * b - visible) + abs(a - bh) + abs(b - bw), a, b)
                for a in range(max(bh - 2, 1), min(bh + 2, h) + 1) for b in range(max(bw - 2, 1), min(bw + 2, w) + 1)
                if lo - 1e-9 <= 1 - a * b / (h * w) <= hi + 1e-9]
        if fits:
            _, bh, bw = min(fits)
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mask = np.ones((h, w), dtype=bool)
    mask[top:top + bh, left:left + bw] = False
    return mask


def random_roll(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roll a [h, w] mask by a uniform offset in [0, h) x [0, w) with wrap-around."""
    h, w = mask.shape
    return np.roll(mask, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
