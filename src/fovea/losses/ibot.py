"""iBOT masked-patch self-distillation loss (METHODS.md section 2)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_patch_weights(masks: Tensor) -> Tensor:
    """Per-masked-patch weights 1 / (#masked patches of its image), in ``masks[masks]`` order.

    masks: bool [N_images, Np] -> float32 [M] with M = masks.sum().
    """
    per_image = masks.sum(dim=1, keepdim=True).clamp_min(1).float()
    return (1.0 / per_image).expand_as(masks)[masks]


def ibot_patch_loss(student: Tensor, teacher_probs: Tensor, weights: Tensor, n_images: int,
                    student_temp: float = 0.1) -> Tensor:
    """``-sum_j w_j sum_k P_t[j,k] log softmax(s_j / tau_s)[k] / n_images`` (float32 scalar).

    student: logits [M, K] of the masked patches; teacher_probs: targets [M, K] of the same patches
    (same view and position); weights: [M] from :func:`masked_patch_weights`; n_images: number of
    global crops G * B (masked or not), so images without masks count in the denominator.
    """
    log_s = F.log_softmax(student.float() / student_temp, dim=-1)
    per_patch = (teacher_probs.float() * log_s).sum(dim=-1)
    return -(per_patch * weights).sum() / max(n_images, 1)
