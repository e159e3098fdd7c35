"""I-JEPA regression loss (METHODS.md section 5)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def jepa_targets(features: Tensor) -> Tensor:
    """Target-encoder patch features [..., D] -> layer-normalised over D (no affine)."""
    return F.layer_norm(features, features.shape[-1:])


def jepa_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, kind: str = "l2",
              beta: float = 1.0) -> Tensor:
    """Mean per-element distance between ``pred`` and ``target`` [N, T, D] over valid target patches.

    ``valid`` [N, T] bool excludes padding. ``kind``: ``l2`` (squared error, the paper) or
    ``smooth_l1`` (Huber with ``beta``, the released code). Returns a scalar.
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
    return (err * w).sum() / w.sum().clamp_min(1.0)
