"""Few-shot classification: n labelled images per class, several random draws, mean and std.

For each n and draw, k-NN (k = min(20, n * classes), votes exp(sim / 0.07)) and logistic
regression (fixed C; there is no validation data at n shots) are fitted on the drawn train
images and scored on the whole test set. Logistic regression standardises features with the mean
and std of ALL train images (their features need no labels), not of the few drawn ones.
"""
from __future__ import annotations

import statistics

import torch
from torch import Tensor

from fovea.eval.knn import knn_accuracy
from fovea.eval.logreg import logreg_eval


def draw_shots(labels: Tensor, n: int, seed: int) -> Tensor:
    """Indices [<= n * C] with n random images of each class in ``labels`` [N] (fewer if a class has fewer)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in labels[labels >= 0].unique().tolist():
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(out).sort().values


def fewshot_eval(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, shots: list[int],
                 draws: int = 5, c: float = 1.0, classifiers: tuple[str, ...] = ("knn", "logreg"),
                 seed: int = 0) -> dict:
    """Few-shot top-1 (%) on train_x [N, D] / test_x [M, D].

    Returns {f"{n}-shot": {clf: {"mean", "std", "runs": [acc per draw]}}}.
    """
    res: dict = {}
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_s, test_s = (train_x - mu) / sd, (test_x - mu) / sd
    for n in shots:
        runs: dict[str, list[float]] = {k: [] for k in classifiers}
        for d in range(draws):
            idx = draw_shots(train_y, n, seed * 1000 + d)
            x, y = train_x[idx], train_y[idx]
            if "knn" in classifiers:
                k = min(20, len(idx))
                runs["knn"].append(knn_accuracy(x, y, test_x, test_y, [k])[k])
            if "logreg" in classifiers:
                runs["logreg"].append(logreg_eval(train_s[idx], y, test_s, test_y, cs=[c], val_fraction=0.0,
                                                  standardise=False)["test_top1"])
        res[f"{n}-shot"] = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0,
                                "runs": [round(a, 2) for a in v]} for k, v in runs.items()}
    return res
