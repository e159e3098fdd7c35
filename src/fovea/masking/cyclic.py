"""Inverse block masks and Franca's CyclicMask (METHODS.md section 4).

An inverse block mask keeps one rectangle visible and masks everything else. Placed inside the grid,
the visible rectangle covers the centre far more often than the corners, so corners are masked far
more often (~84% vs ~3% at the centre). CyclicMask rolls the mask by a uniform 2-D offset with
wrap-around, which makes every position equally likely to be masked.
"""
from __future__ import annotations

import math

import numpy as np


def visible_shape(h: int, w: int, n_visible: int, aspect: float) -> tuple[int, int, int]:
    """(rows, cols, extra) of a visible region of exactly ``n_visible`` cells on an [h, w] grid.

    The region is a ``rows x cols`` rectangle plus ``extra`` (< cols) cells of one more row below it
    when ``n_visible`` has no factorisation that fits the grid near the wanted ``aspect`` (rows/cols).
    Among the heights a = 1..h (each with the widest fitting width), the one whose aspect is nearest
    to ``aspect`` is chosen, whole rectangles (extra = 0) first on a tie.
    """
    n_visible = int(min(max(n_visible, 0), h * w))
    if n_visible == 0:
        return 0, 0, 0
    best: tuple[float, int, int, int, int] | None = None
    for a in range(1, h + 1):
        b = min(w, n_visible // a)
        if b == 0:
            continue
        extra = n_visible - a * b
        if extra and not (a < h and extra < b):  # the partial row must fit under the rectangle
            continue
        rows = a + (1 if extra else 0)
        score = abs(math.log(rows / b) - math.log(aspect))
        cand = (score, 1 if extra else 0, a, b, extra)
        if best is None or cand < best:
            best = cand
    assert best is not None  # a = max(n // w, 1) rows of width min(w, n), plus a partial row, always fits
    return best[2], best[3], best[4]


def inverse_block_mask(h: int, w: int, ratio: float, rng: np.random.Generator,
                       min_aspect: float = 0.3) -> np.ndarray:
    """Bool [h, w] mask with exactly ``round(ratio * h * w)`` masked cells; the visible rest is one rectangle.

    The visible region (:func:`visible_shape`) has a log-uniform aspect ratio in (min_aspect,
    1/min_aspect) and a uniform position inside the grid; when its cell count has no fitting
    factorisation, the rectangle gets a partial extra row (at a uniform offset under it), so the masked
    count is always exact (METHODS.md section 4).
    """
    n_mask = int(min(max(round(ratio * h * w), 0), h * w))
    ar = math.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
    a, b, extra = visible_shape(h, w, h * w - n_mask, ar)
    mask = np.ones((h, w), dtype=bool)
    if a == 0:
        return mask
    rows = a + (1 if extra else 0)
    top, left = int(rng.integers(0, h - rows + 1)), int(rng.integers(0, w - b + 1))
    mask[top:top + a, left:left + b] = False
    if extra:
        off = int(rng.integers(0, b - extra + 1))
        mask[top + a, left + off:left + off + extra] = False
    return mask


def random_roll(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Roll a [h, w] mask by a uniform offset in [0, h) x [0, w) with wrap-around."""
    h, w = mask.shape
    return np.roll(mask, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
