"""Sinkhorn-Knopp centering of teacher logits (SwAV / DINOv2; METHODS.md section 3)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def sinkhorn_knopp(teacher: Tensor, teacher_temp: float, n_iters: int = 3,
                   n_total: int | Tensor | None = None) -> Tensor:
    """Teacher targets [B_local, K] from logits [B_local, K] by Sinkhorn-Knopp, in float32.

    ``Q = exp(t / tau)^T`` (K x B) is alternately normalised so that every prototype (row) gets mass
    1/K (row sums all-reduced over ranks) and every sample (column) mass 1/B_total, ``n_iters`` times;
    the result is returned transposed and multiplied by B_total, so each sample's target sums to 1.
    ``B_total`` is ``n_total`` when given (e.g. the all-reduced number of masked patches), else the
    all-reduced row count. The per-sample maximum of t / tau is subtracted before ``exp``, so logits of
    any size stay finite (the official code overflows above ~3.5 at tau 0.04). A per-sample factor does
    not change the Sinkhorn fixed point; after 3 iterations the result differs from the unshifted
    algorithm only when row maxima differ, by the truncation of the iterations. A prototype with no
    mass at all is left at zero instead of dividing by 0.
    """
    z = teacher.float() / teacher_temp
    q = torch.exp(z - z.max(dim=1, keepdim=True).values).t()  # [K, B], each column's max entry is 1
    k = q.shape[0]
    if n_total is None:
        n = torch.tensor(float(q.shape[1]), device=q.device)
        if _dist():
            dist.all_reduce(n)
    else:
        n = torch.as_tensor(n_total, dtype=torch.float32, device=q.device)
    total = q.sum()
    if _dist():
        dist.all_reduce(total)
    q = q / total
    for _ in range(n_iters):
        rows = q.sum(dim=1, keepdim=True)
        if _dist():
            dist.all_reduce(rows)
        q = q / rows.clamp_min(torch.finfo(q.dtype).tiny) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t()
