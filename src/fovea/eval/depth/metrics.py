"""Depth metrics and the training loss of the linear depth probe (METHODS.md section 6b), pure functions.

Valid pixels: ground truth ``gt`` in ``(min_depth, max_depth]`` (and, for NYU, inside the Eigen crop:
rows 45:471, columns 41:601 of a 480x640 label). Predictions are clipped to ``[min_depth, max_depth]``
before scoring (as the BTS / ZoeDepth evaluators do; the probe's output already lies there).

Per image, over its N valid pixels (``d = log(pred) - log(gt)``, natural logs):

- ``a1``, ``a2``, ``a3`` = 100 * fraction with ``max(gt / pred, pred / gt) < 1.25, 1.25**2, 1.25**3``
- ``abs_rel`` = mean(|gt - pred| / gt); ``sq_rel`` = mean((gt - pred)**2 / gt)
- ``rmse`` = sqrt(mean((gt - pred)**2)); ``rmse_log`` = sqrt(mean(d**2))
- ``log_10`` = mean(|log10(gt) - log10(pred)|); ``mae`` = mean(|gt - pred|) (metres)
- ``silog`` = 100 * sqrt(mean(d**2) - mean(d)**2) (BTS / ZoeDepth's eval; the radicand is clamped at 0)

then each metric is averaged over the images that have at least one valid pixel (images without any are
counted, not scored). :func:`pooled_metrics` computes the same over all valid pixels at once, which is
NOT the protocol (it weights images by their valid pixel count and takes square roots after pooling).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: the metric names, in report order
METRICS = ("a1", "a2", "a3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log_10", "silog", "mae")
#: the Eigen crop of a 480x640 NYU label: (top, bottom, left, right), rows top:bottom, columns left:right
EIGEN_CROP = (45, 471, 41, 601)
EIGEN_SIZE = (480, 640)


def eigen_mask(shape: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: the Eigen crop of a label of ``shape``; at 480x640 rows 45:471 and columns 41:601,
    at another size the same box scaled by H / 480 and W / 640 (rounded half up: 240x320 -> 23:236, 21:301)."""
    h, w = shape
    t, b, lft, r = EIGEN_CROP
    sy, sx = h / EIGEN_SIZE[0], w / EIGEN_SIZE[1]
    m = np.zeros((h, w), dtype=bool)
    def rd(v: float) -> int:
        return int(np.floor(v + 0.5))
    m[rd(t * sy):rd(b * sy), rd(lft * sx):rd(r * sx)] = True
    return m


def valid_mask(gt: np.ndarray, min_depth: float, max_depth: float, crop: bool = False) -> np.ndarray:
    """bool [H, W]: ``min_depth < gt <= max_depth`` (finite), and inside the Eigen crop when ``crop``."""
    m = np.isfinite(gt) & (gt > min_depth) & (gt <= max_depth)
    if crop:
        m &= eigen_mask(gt.shape[:2])
    return m


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The metrics (see the module doc) of matching 1-D arrays of valid pixels ``pred``, ``gt`` [N]
    (metres, both > 0), in float64. a1..a3 in percent, silog x 100, the rest as is."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must be equal non-empty 1-D arrays")
    thresh = np.maximum(g / p, p / g)
    d = np.log(p) - np.log(g)
    diff = g - p
    return {
        "a1": float((thresh < 1.25).mean() * 100), "a2": float((thresh < 1.25 ** 2).mean() * 100),
        "a3": float((thresh < 1.25 ** 3).mean() * 100),
        "abs_rel": float(np.mean(np.abs(diff) / g)), "sq_rel": float(np.mean(diff ** 2 / g)),
        "rmse": float(np.sqrt(np.mean(diff ** 2))), "rmse_log": float(np.sqrt(np.mean(d ** 2))),
        "log_10": float(np.mean(np.abs(np.log10(g) - np.log10(p)))),
        "silog": float(np.sqrt(max(np.mean(d ** 2) - np.mean(d) ** 2, 0.0)) * 100),
        "mae": float(np.mean(np.abs(diff))),
    }


def image_metrics(pred: np.ndarray, gt: np.ndarray, min_depth: float, max_depth: float,
                  crop: bool = False) -> dict[str, float] | None:
    """Metrics of one image: ``pred``, ``gt`` [H, W] in metres (same shape; invalid gt pixels are 0 or out of
    range), scored on :func:`valid_mask` with ``pred`` clipped to [min_depth, max_depth]; None when the
    image has no valid pixel."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and label {gt.shape} differ in size")
    m = valid_mask(gt, min_depth, max_depth, crop)
    if not m.any():
        return None
    p = np.clip(np.nan_to_num(pred[m].astype(np.float64), nan=min_depth, posinf=max_depth), min_depth, max_depth)
    return depth_metrics(p, gt[m])


def average_metrics(per_image: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over images (the protocol's aggregation); nan for each when empty."""
    if not per_image:
        return {k: float("nan") for k in METRICS}
    return {k: float(np.mean([r[k] for r in per_image])) for k in METRICS}


def pooled_metrics(preds: list[np.ndarray], gts: list[np.ndarray], min_depth: float, max_depth: float,
                   crop: bool = False) -> dict[str, float]:
    """The metrics over all valid pixels of all images pooled (NOT the protocol; for comparison)."""
    ps, gs = [], []
    for p, g in zip(preds, gts):
        m = valid_mask(g, min_depth, max_depth, crop)
        ps.append(np.clip(p[m].astype(np.float64), min_depth, max_depth))
        gs.append(g[m])
    return depth_metrics(np.concatenate(ps), np.concatenate(gs))


def sig_loss(pred: Tensor, gt: Tensor, valid: Tensor, lam: float = 0.85) -> Tensor:
    """Scale-invariant log loss (SigLoss of BTS / AdaBins / DINOv2): with ``g = log(pred) - log(gt)`` over
    the valid pixels of the whole batch pooled, ``sqrt(mean(g**2) - lam * mean(g)**2)``, lam = 0.85.

    ``pred``, ``gt`` [B, H, W] (metres, pred > 0), ``valid`` bool [B, H, W]. Means are plain (biased)
    means; no x10 factor (BTS and AdaBins multiply by 10; DINOv2's SigLoss has loss_weight 1.0 and
    none); no warm-up phase; the radicand is clamped at 1e-12 so the gradient stays finite. A batch
    without valid pixels gives 0 (still attached to the graph). Returns a scalar.
    """
    if not bool(valid.any()):
        return pred.sum() * 0.0
    g = torch.log(pred[valid]) - torch.log(gt[valid].to(pred.dtype))
    return torch.sqrt((torch.mean(g ** 2) - lam * torch.mean(g) ** 2).clamp_min(1e-12))
