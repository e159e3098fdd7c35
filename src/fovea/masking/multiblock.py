"""I-JEPA multi-block mask sampler on the patch grid (METHODS.md section 5).

Per image: ``M`` target blocks, each with a scale (fraction of the grid's patches) and an
aspect ratio (height / width) drawn *independently*, and one context block; every target
patch is removed from the context, and the whole draw is repeated until the context keeps at
least ``min_context`` patches. Block corners are uniform over every position where the block
fits (``top`` in ``0 .. H - h`` inclusive), so the last row and column are reachable.

Batches are made equal-length by :func:`pad_indices` (padding + validity mask, the default)
or :func:`subsample_indices` (random subsets of the batch-minimum length, never the first
indices in order), avoiding the official collator's top-row bias.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class Block:
    """A rectangle of patches: rows ``top .. top+h-1``, columns ``left .. left+w-1``."""

    top: int
    left: int
    h: int
    w: int
    scale: float  # drawn scale (before rounding to whole patches)
    aspect: float  # drawn aspect ratio h / w (before rounding)

    def indices(self, grid_w: int) -> np.ndarray:
        """Row-major patch indices of the block (int64 [h*w])."""
        rows = np.arange(self.top, self.top + self.h)
        cols = np.arange(self.left, self.left + self.w)
        return (rows[:, None] * grid_w + cols[None, :]).reshape(-1).astype(np.int64)


@dataclass
class MaskDraw:
    """One image's masks: context indices (sorted) and one index array per target block."""

    context: np.ndarray
    targets: list[np.ndarray]
    blocks: list[Block]  # the target blocks then the context block (for statistics / pictures)
    tries: int  # number of draws needed to satisfy ``min_context``


class MultiBlockSampler:
    """Draws I-JEPA context/target masks on an ``grid_h x grid_w`` patch grid."""

    def __init__(self, grid_h: int, grid_w: int, num_targets: int = 4,
                 target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
                 context_scale: tuple[float, float] = (0.85, 1.0), context_aspect: tuple[float, float] = (1.0, 1.0),
                 min_context: int = 10, max_tries: int = 100) -> None:
        if grid_h < 1 or grid_w < 1 or num_targets < 1:
            raise ValueError("grid and num_targets must be positive")
        if min_context > grid_h * grid_w:
            raise ValueError(f"min_context={min_context} exceeds the {grid_h}x{grid_w} grid")
        self.gh, self.gw, self.m = grid_h, grid_w, num_targets
        self.target_scale, self.target_aspect = target_scale, target_aspect
        self.context_scale, self.context_aspect = context_scale, context_aspect
        self.min_context, self.max_tries = min_context, max_tries

    def block(self, rng: np.random.Generator, scale: tuple[float, float], aspect: tuple[float, float]) -> Block:
        """One block: scale ~ U(scale) and aspect (h/w) ~ U(aspect) drawn separately; corner uniform."""
        s = float(rng.uniform(*scale))
        a = float(rng.uniform(*aspect))
        area = s * self.gh * self.gw
        h = min(max(int(round(math.sqrt(area * a))), 1), self.gh)
        w = min(max(int(round(math.sqrt(area / a))), 1), self.gw)
        top = int(rng.integers(0, self.gh - h + 1))  # inclusive of the last position where it fits
        left = int(rng.integers(0, self.gw - w + 1))
        return Block(top, left, h, w, s, a)

    def sample(self, rng: np.random.Generator) -> MaskDraw:
        """Targets and context for one image; resamples everything until the context is large enough."""
        for tries in range(1, self.max_tries + 1):
            targets = [self.block(rng, self.target_scale, self.target_aspect) for _ in range(self.m)]
            ctx_block = self.block(rng, self.context_scale, self.context_aspect)
            covered = np.zeros(self.gh * self.gw, dtype=bool)
            tgt_idx = [b.indices(self.gw) for b in targets]
            for t in tgt_idx:
                covered[t] = True
            ctx = ctx_block.indices(self.gw)
            ctx = np.sort(ctx[~covered[ctx]])
            if len(ctx) >= self.min_context:
                return MaskDraw(ctx, tgt_idx, targets + [ctx_block], tries)
        raise RuntimeError(f"no mask with >= {self.min_context} context patches in {self.max_tries} draws on a "
                           f"{self.gh}x{self.gw} grid; lower ijepa.min_context or the target scale")


def pad_indices(seqs: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """Variable-length index arrays -> (indices [N, Lmax] long, valid [N, Lmax] bool); padding is index 0, invalid."""
    n, lmax = len(seqs), max(len(s) for s in seqs)
    idx = torch.zeros(n, lmax, dtype=torch.long)
    valid = torch.zeros(n, lmax, dtype=torch.bool)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.from_numpy(s)
        valid[i, :len(s)] = True
    return idx, valid


def subsample_indices(seqs: list[np.ndarray], rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Equal length by keeping a uniformly random subset (size = shortest) of each array, sorted.

    Returns (indices [N, Lmin] long, valid [N, Lmin] all True).
    """
    lmin = min(len(s) for s in seqs)
    rows = [np.sort(rng.choice(s, size=lmin, replace=False)) if len(s) > lmin else s for s in seqs]
    idx = torch.from_numpy(np.stack(rows).astype(np.int64))
    return idx, torch.ones_like(idx, dtype=torch.bool)
