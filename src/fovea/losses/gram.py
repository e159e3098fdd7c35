"""Gram anchoring (DINOv3, METHODS.md section 5b): keep the student's patch similarities near a frozen snapshot's."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def gram_loss(student: Tensor, gram_teacher: Tensor) -> Tensor:
    """Mean over images and over the P x P entries of (X_S X_S^T - X_G X_G^T)^2, in float32.

    ``student`` and ``gram_teacher`` are patch tokens [B, P, D] of the same images on the same grid;
    each token is L2-normalised first, so the Gram matrices hold cosine similarities. Negative
    similarities are kept (the released 7B config does not clip them).
    """
    if student.shape[:2] != gram_teacher.shape[:2]:
        raise ValueError(f"gram_loss: student patches {tuple(student.shape)} and Gram-teacher patches "
                         f"{tuple(gram_teacher.shape)} must have the same images and grid")
    xs = F.normalize(student.float(), dim=-1)
    xg = F.normalize(gram_teacher.float(), dim=-1)
    return (xs @ xs.transpose(1, 2) - xg @ xg.transpose(1, 2)).square().mean()


def resize_patch_grid(patches: Tensor, h: int, w: int, out_h: int, out_w: int) -> Tensor:
    """Patch tokens [B, h*w, D] on an h x w grid -> [B, out_h*out_w, D], resized bicubically (no corner
    alignment); the identity when the grids are equal. Used when the Gram teacher sees a larger crop."""
    if (h, w) == (out_h, out_w):
        return patches
    b, _, d = patches.shape
    grid = patches.transpose(1, 2).reshape(b, d, h, w).float()
    grid = F.interpolate(grid, size=(out_h, out_w), mode="bicubic", align_corners=False)
    return grid.reshape(b, d, out_h * out_w).transpose(1, 2).to(patches.dtype)
