"""I-JEPA regression loss (METHODS.md section 5)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def jepa_targets(features: Tensor) -> Tensor:
    """Target-encoder patch features [..., D] -> layer-normalised over D (no affine)."""
    return F.layer_norm(features, features.shape[-1:])


def jepa_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, kind: str = "l2",
              beta: float = 1.0, count: Tensor | None = None) -> Tensor:
    """Mean per-element distance between ``pred`` and ``target`` [N, T, D] over valid target patches.

    ``valid`` [N, T] bool excludes padding. ``kind``: ``l2`` (squared error, the paper) or
    ``smooth_l1`` (Huber with ``beta``, the released code). ``count`` replaces the number of valid
    patches in the denominator: data-parallel training passes the global count divided by the number
    of ranks, so that averaging the ranks' gradients gives the mean over every target patch of the
    global batch (the same step as one process), not a mean of per-rank means. Returns a scalar.
    """
    if kind == "l2":
        err = (pred - target).pow(2)
    elif kind == "smooth_l1":
        err = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    else:
        raise ValueError(f"unknown JEPA loss {kind!r}; choose l2 or smooth_l1")
    err = err.float().mean(-1)  # [N, T]
    if valid is None:
        return err.mean()
    w = valid.to(err.dtype)
    n = w.sum() if count is None else count.to(err.dtype)
    return (err * w).sum() / n.clamp_min(1.0)
