"""BEiT-style block masking of a patch grid (iBOT / DINOv2 masked image modelling, METHODS.md section 2).

Masks are drawn in the data pipeline from a seeded ``numpy.random.Generator`` so that they are a pure
function of (seed, epoch, index): resumed and multi-rank runs see the same masks.
"""
from __future__ import annotations

import math

import numpy as np

from fovea.masking.cyclic import inverse_block_mask, random_roll


def block_mask(h: int, w: int, n_masked: int, rng: np.random.Generator, min_block: int = 4,
               min_aspect: float = 0.3) -> np.ndarray:
    """Bool [h, w] mask with exactly ``n_masked`` True cells, made of random rectangles.

    Rectangles (area U(min_block, remaining), log-uniform aspect ratio in (min_aspect, 1/min_aspect),
    uniform position) are added while they cover new cells without exceeding the target; after 10
    failed tries in a row, the remainder is filled with random unmasked cells, so the count is exact.
    """
    n_masked = int(min(max(n_masked, 0), h * w))
    mask = np.zeros((h, w), dtype=bool)
    fails = 0
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    while mask.sum() < n_masked and fails < 10:
        remaining = n_masked - int(mask.sum())
        area = rng.uniform(min(min_block, remaining), remaining)
        ar = math.exp(rng.uniform(*log_ar))
        bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if not (1 <= bh <= h and 1 <= bw <= w):
            fails += 1
            continue
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        new = int((~mask[top:top + bh, left:left + bw]).sum())
        if 0 < new <= remaining:
            mask[top:top + bh, left:left + bw] = True
            fails = 0
        else:
            fails += 1
    short = n_masked - int(mask.sum())
    if short > 0:
        free = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[rng.choice(free, size=short, replace=False)] = True
    return mask


MASK_TYPES = ("block", "inverse_block", "cyclic")


class BlockMasker:
    """Masks for the global crops of one image: each crop is masked with probability ``prob``;
    a masked crop masks a fraction r ~ U(ratio_min, ratio_max) of its patches.

    ``kind``: ``block`` (round(r * Np) patches as BEiT blocks), ``inverse_block`` (round(r * Np) patches: everything
    but one visible rectangle, :func:`fovea.masking.cyclic.inverse_block_mask`) or ``cyclic`` (Franca's
    CyclicMask: inverse block + roll). ``roll`` adds the uniform 2-D roll to the other kinds.
    """

    def __init__(self, grid: int, prob: float, ratio: tuple[float, float], min_block: int = 4,
                 kind: str = "block", roll: bool = False) -> None:
        if kind not in MASK_TYPES:
            raise ValueError(f"mask type must be one of {MASK_TYPES}, got {kind!r}")
        self.grid, self.prob, self.ratio, self.min_block = grid, prob, ratio, min_block
        self.kind, self.roll = kind, roll or kind == "cyclic"

    def one(self, rng: np.random.Generator) -> np.ndarray:
        """Bool [grid, grid] mask of one masked crop."""
        r = rng.uniform(*self.ratio)
        if self.kind == "block":
            m = block_mask(self.grid, self.grid, int(round(r * self.grid * self.grid)), rng, self.min_block)
        else:
            m = inverse_block_mask(self.grid, self.grid, r, rng)
        return random_roll(m, rng) if self.roll else m

    def __call__(self, seed: int, n_crops: int = 2) -> np.ndarray:
        """Bool [n_crops, grid * grid] masks, a pure function of ``seed``."""
        rng = np.random.default_rng([seed, 0x1B07])
        out = np.zeros((n_crops, self.grid * self.grid), dtype=bool)
        for c in range(n_crops):
            if rng.random() < self.prob:
                out[c] = self.one(rng).reshape(-1)
        return out
