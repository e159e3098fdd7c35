"""Out-of-distribution detection with the k-th-nearest-neighbour score (METHODS.md section 6).

score(x) = cosine similarity of x to its k-th nearest in-distribution training feature (higher =
more in-distribution). AUROC treats in-distribution test images as positives; FPR@95 is the
fraction of OOD images scored at or above the threshold that keeps 95% of in-distribution ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def knn_score(bank: Tensor, queries: Tensor, k: int, chunk: int = 2048) -> Tensor:
    """Cosine similarity [M] of each query [M, D] to its k-th nearest row of ``bank`` [N, D]."""
    b = F.normalize(bank.float(), dim=1)
    q = F.normalize(queries.float(), dim=1)
    k = max(1, min(k, b.shape[0]))
    out = [(q[lo:lo + chunk] @ b.T).topk(k, dim=1).values[:, -1] for lo in range(0, q.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0)


def auroc(pos: Tensor, neg: Tensor) -> float:
    """Area under the ROC curve of scores pos [P] (positives) vs neg [Q]: P(pos > neg) + 0.5 P(tie)."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    s = torch.cat([pos, neg]).double()
    order = s.argsort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv = s.unique(return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / counts)[inv]
    p, q = len(pos), len(neg)
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * q))


def fpr_at_tpr(pos: Tensor, neg: Tensor, tpr: float = 0.95) -> float:
    """Fraction of negatives [Q] with score >= the threshold at which ``tpr`` of positives [P] are kept.

    The threshold is the largest score t with mean(pos >= t) >= tpr.
    """
    srt = pos.double().sort(descending=True).values
    need = int(torch.ceil(torch.tensor(tpr * len(srt) - 1e-9)).item())
    t = srt[max(need, 1) - 1]
    return float((neg.double() >= t).double().mean())


def ood_eval(train_x: Tensor, id_x: Tensor, ood_x: Tensor, ks: list[int] | None = None) -> dict:
    """k-th-NN OOD detection: bank train_x [N, D], in-distribution test id_x [M, D], OOD ood_x [Q, D].

    Returns {f"k={k}": {"auroc": %, "fpr95": %}}.
    """
    out = {}
    for k in ks or [1, 50]:
        si, so = knn_score(train_x, id_x, k), knn_score(train_x, ood_x, k)
        out[f"k={k}"] = {"auroc": auroc(si, so) * 100, "fpr95": fpr_at_tpr(si, so) * 100}
    return out
