"""Sinkhorn-Knopp centering of teacher logits (SwAV / DINOv2; METHODS.md section 3), in the log domain."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_logsumexp(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """``log(sum(exp(x)))`` over ``dim`` (all entries when None) summed over every rank.

    Each rank's part is combined by an all-reduced maximum, then an all-reduced sum of
    ``exp(x - max)``, so it is exact and finite for any finite ``x``; a rank with no entries
    (empty ``dim``) contributes nothing. Without a process group it is ``torch.logsumexp``.
    """
    if dim is None:
        x, dim, keepdim = x.reshape(-1), 0, False
    if x.shape[dim] > 0:
        m = x.amax(dim=dim, keepdim=True)
    else:
        m = torch.full_like(x.sum(dim=dim, keepdim=True), float("-inf"))
    if _dist():
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # no entry anywhere: log 0 = -inf below
    s = torch.exp(x - m).sum(dim=dim, keepdim=True)
    if _dist():
        dist.all_reduce(s)
    out = torch.log(s) + m
    return out if keepdim else out.squeeze(dim)


@torch.no_grad()
def sinkhorn_knopp(teacher: Tensor, teacher_temp: float, n_iters: int = 3,
                   n_total: int | Tensor | None = None) -> Tensor:
    """Teacher targets [B_local, K] from logits [B_local, K] by Sinkhorn-Knopp, in float32.

    The official algorithm: ``Q = exp(t / tau)^T`` (K x B), ``Q /= sum(Q)`` over all ranks, then
    ``n_iters`` times ``Q /= row sums (all-reduced); Q /= K; Q /= column sums; Q /= B_total``, and
    ``(Q * B_total)^T`` is returned, so each sample's target sums to 1. ``B_total`` is ``n_total`` when
    given (e.g. the all-reduced number of masked patches), else the all-reduced row count.

    Computed on ``log Q`` with logsumexp normalisations (row log-sums combined over ranks by an
    all-reduced max and sum): equal to the official algorithm wherever that is finite and finite where
    it overflows (the official code returns NaN for logits above ~3.5 at tau 0.04). No per-sample
    maximum is subtracted: that factor only cancels at convergence and changes the 3-iteration targets.
    """
    log_q = (teacher.float() / teacher_temp).t()  # [K, B_local]
    k = log_q.shape[0]
    if n_total is None:
        n = torch.tensor(float(log_q.shape[1]), device=log_q.device)
        if _dist():
            dist.all_reduce(n)
    else:
        n = torch.as_tensor(n_total, dtype=torch.float32, device=log_q.device)
    log_n, log_k = torch.log(n), math.log(k)
    log_q = log_q - global_logsumexp(log_q)
    for _ in range(n_iters):
        log_q = log_q - global_logsumexp(log_q, dim=1, keepdim=True) - log_k  # every prototype: mass 1/K
        if log_q.shape[1] > 0:
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_n  # every sample: mass 1/B
    return torch.exp(log_q + log_n).t()
