"""PCK (percentage of correct keypoints) of keypoint transfer, as SPair / probe3d score it.

A predicted target point is correct when its Euclidean distance to the true target keypoint, both in
ORIGINAL target pixels, is strictly below ``alpha * max(x2 - x1, y2 - y1)`` of the target box. PCK per
keypoint pools every keypoint of every pair; PCK per image is the mean over pairs of each pair's own
fraction (a pair with many keypoints weighs no more than one with few). All figures in percent.
Pure numpy functions.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def bbox_max_side(bbox: Sequence[float] | np.ndarray) -> float:
    """max(width, height) of a box [x1, y1, x2, y2] (width = x2 - x1, in pixels)."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return max(x2 - x1, y2 - y1)


def pck_threshold(bbox: Sequence[float] | np.ndarray, alpha: float) -> float:
    """The distance a correct point must stay below: alpha * max side of ``bbox`` (original pixels)."""
    return float(alpha) * bbox_max_side(bbox)


def correct_mask(pred: np.ndarray, true: np.ndarray, threshold: float) -> np.ndarray:
    """pred, true [K, 2] (x, y) in original target pixels -> bool [K]: distance < threshold."""
    d = np.linalg.norm(np.asarray(pred, np.float64) - np.asarray(true, np.float64), axis=1)
    return d < threshold


def _pck(correct: Sequence[np.ndarray]) -> dict[str, float | int]:
    """{"per_keypoint", "per_image"} in percent and the counts of a list of per-pair bool arrays."""
    n_kps = int(sum(len(c) for c in correct))
    if not correct or n_kps == 0:
        return {"per_keypoint": float("nan"), "per_image": float("nan"), "n_pairs": len(correct), "n_keypoints": 0}
    hits = sum(int(np.count_nonzero(c)) for c in correct)
    per_image = float(np.mean([np.count_nonzero(c) / len(c) for c in correct if len(c)]))
    return {"per_keypoint": 100.0 * hits / n_kps, "per_image": 100.0 * per_image,
            "n_pairs": len(correct), "n_keypoints": n_kps}


def pck(correct: Sequence[np.ndarray], categories: Sequence[str]) -> dict:
    """PCK of pairs (``correct[i]`` = bool [K_i] of pair i, ``categories[i]`` its category) overall and
    per category: ``{"per_keypoint", "per_image", "n_pairs", "n_keypoints", "per_category": {cat: {...}}}``
    (categories sorted by name)."""
    if len(correct) != len(categories):
        raise ValueError(f"{len(correct)} pairs but {len(categories)} categories")
    out: dict = _pck(correct)
    by: dict[str, list[np.ndarray]] = {}
    for c, cat in zip(correct, categories):
        by.setdefault(cat, []).append(c)
    out["per_category"] = {cat: _pck(by[cat]) for cat in sorted(by)}
    return out


def pck_table(correct_by_alpha: Mapping[float, Sequence[np.ndarray]], categories: Sequence[str]) -> dict:
    """``{"pck@<alpha>": pck(...)}`` for each alpha (key written with ``%g``: ``pck@0.1``)."""
    return {f"pck@{a:g}": pck(c, categories) for a, c in correct_by_alpha.items()}
