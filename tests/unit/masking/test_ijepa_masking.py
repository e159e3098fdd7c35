"""I-JEPA multi-block sampler: statistics over many draws, equal-length batching, the collate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fovea.data.single_view import MaskCollate
from fovea.masking.multiblock import MultiBlockSampler, pad_indices, subsample_indices


def draws(sampler: MultiBlockSampler, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sampler.sample(rng) for _ in range(n)]


@pytest.mark.parametrize("gh,gw", [(8, 8), (14, 14), (6, 9)])
def test_context_and_targets_disjoint_and_every_position_reachable(gh: int, gw: int) -> None:
    s = MultiBlockSampler(gh, gw)  # published defaults: M=4, (0.15, 0.2), (0.75, 1.5), context (0.85, 1), min 10
    n_pos = gh * gw
    tgt_count, ctx_count = np.zeros(n_pos, int), np.zeros(n_pos, int)
    for d in draws(s, 3000):
        tgt = np.concatenate(d.targets)
        assert not np.isin(d.context, tgt).any()  # no patch is both context and target
        assert len(d.context) >= 10 and len(np.unique(d.context)) == len(d.context)
        assert len(d.targets) == 4
        tgt_count[np.unique(tgt)] += 1
        ctx_count[d.context] += 1
    grid_t, grid_c = tgt_count.reshape(gh, gw), ctx_count.reshape(gh, gw)
    assert (tgt_count > 0).all(), f"positions never a target:\n{grid_t}"
    assert (ctx_count > 0).all(), f"positions never context:\n{grid_c}"
    # the official sampler's randint(0, H - h) never reaches the last row / column; ours must
    assert grid_t[-1].min() > 0 and grid_t[:, -1].min() > 0 and grid_c[-1].min() > 0 and grid_c[:, -1].min() > 0
    # and the grid is symmetric under flips in distribution: last row about as often as the first
    for a, b in ((grid_t[0], grid_t[-1]), (grid_t[:, 0], grid_t[:, -1]), (grid_c[0], grid_c[-1])):
        assert abs(a.sum() - b.sum()) / (a.sum() + b.sum()) < 0.1


def test_target_scale_and_aspect_in_range_and_independent() -> None:
    s = MultiBlockSampler(32, 32, num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5))
    blocks = [b for d in draws(s, 1500, seed=1) for b in d.blocks[:4]]
    scale = np.array([b.scale for b in blocks])
    aspect = np.array([b.aspect for b in blocks])
    assert scale.min() >= 0.15 and scale.max() <= 0.2 and aspect.min() >= 0.75 and aspect.max() <= 1.5
    # the official collator drives both from one random number (perfect correlation); ours are independent
    assert abs(np.corrcoef(scale, aspect)[0, 1]) < 0.05
    # both ranges are covered, not a single value (uniform: std = range / sqrt(12))
    assert scale.std() == pytest.approx(0.05 / 12 ** 0.5, rel=0.1)
    assert aspect.std() == pytest.approx(0.75 / 12 ** 0.5, rel=0.1)
    # realised (whole-patch) blocks stay in range up to rounding to whole patches on a 32x32 grid
    real_scale = np.array([b.h * b.w / 1024 for b in blocks])
    real_aspect = np.array([b.h / b.w for b in blocks])
    assert real_scale.min() >= 0.15 * 0.85 and real_scale.max() <= 0.2 * 1.15
    assert real_aspect.min() >= 0.75 * 0.85 and real_aspect.max() <= 1.5 * 1.15
    assert abs(np.corrcoef(real_scale, real_aspect)[0, 1]) < 0.1
    # context blocks: aspect exactly 1, scale within (0.85, 1)
    ctx = [d.blocks[4] for d in draws(s, 300, seed=2)]
    assert all(b.h == b.w and 0.85 * 0.95 <= b.h * b.w / 1024 <= 1.0 for b in ctx)


def test_min_context_is_resampled_not_violated() -> None:
    # 4 large targets on an 8x8 grid leave little context; demand 24 patches
    s = MultiBlockSampler(8, 8, num_targets=4, target_scale=(0.2, 0.3), min_context=24)
    ds = draws(s, 500, seed=3)
    assert all(len(d.context) >= 24 for d in ds)
    assert max(d.tries for d in ds) > 1  # the constraint was active, so resampling happened
    with pytest.raises(RuntimeError, match="min_context"):
        MultiBlockSampler(4, 4, num_targets=4, target_scale=(0.5, 0.5), min_context=15, max_tries=5).sample(
            np.random.default_rng(0))


def test_pad_indices_hand_case() -> None:
    idx, valid = pad_indices([np.array([3, 5, 7]), np.array([1])])
    assert idx.tolist() == [[3, 5, 7], [1, 0, 0]]
    assert valid.tolist() == [[True, True, True], [True, False, False]]


def test_subsample_is_uniform_not_index_order() -> None:
    rng = np.random.default_rng(0)
    long, short = np.arange(10), np.arange(20, 24)
    kept = np.zeros(10)
    for _ in range(2000):
        idx, valid = subsample_indices([long, short], rng)
        assert idx.shape == (2, 4) and bool(valid.all())
        assert idx[1].tolist() == [20, 21, 22, 23]  # the shortest is kept whole
        row = idx[0].numpy()
        assert (np.diff(row) > 0).all() and np.isin(row, long).all()
        kept[row] += 1
    # each of the 10 indices is kept with probability 4/10 (truncation would keep only 0..3)
    assert np.abs(kept / 2000 - 0.4).max() < 0.05


@pytest.mark.parametrize("equalize", ["pad", "subsample"])
def test_collate_shapes_determinism_and_padding(equalize: str) -> None:
    s = MultiBlockSampler(8, 8)
    col = MaskCollate(s, equalize)
    items = [(torch.full((3, 32, 32), i, dtype=torch.uint8), 1000 + i, i % 2) for i in range(6)]
    a, b = col(items), col(items)
    for k in ("ctx_idx", "ctx_valid", "tgt_idx", "tgt_valid"):
        assert torch.equal(a[k], b[k]), k  # masks are a pure function of the per-sample seeds
    assert a["images"].shape == (6, 3, 32, 32) and a["skipped"] == 3
    assert a["tgt_idx"].shape[:2] == (6, 4) and a["ctx_idx"].shape[0] == 6
    for i, it in enumerate(items):
        d = s.sample(np.random.default_rng(it[1]))
        ctx = a["ctx_idx"][i][a["ctx_valid"][i]].tolist()
        if equalize == "pad":
            assert ctx == d.context.tolist()
            for m in range(4):
                assert a["tgt_idx"][i, m][a["tgt_valid"][i, m]].tolist() == d.targets[m].tolist()
        else:
            assert set(ctx) <= set(d.context.tolist())
        tgt = set(a["tgt_idx"][i][a["tgt_valid"][i]].tolist())
        assert not tgt & set(ctx)
