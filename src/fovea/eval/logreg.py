"""Logistic regression on frozen features: L-BFGS (scikit-learn) with a sweep of C.

C runs over 10^[-6 ... 5] (METHODS.md section 6). The sweep fits on train minus a stratified
validation split (optionally a random subset of it, to bound the cost), picks C on validation,
refits on the whole train set and reports test top-1. Features are standardised with the
train mean and std first, so one C grid suits any backbone.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from fovea.eval.bank import split_train_val

C_GRID = tuple(float(10.0 ** e) for e in range(-6, 6))


def _standardise(train: Tensor, *others: Tensor, on: bool = True) -> list[np.ndarray]:
    """(x - mean_train) / std_train (identity when not ``on``) for every matrix [*, D] -> float32 numpy."""
    if not on:
        return [x.numpy().astype(np.float32) for x in (train, *others)]
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    return [((x - mu) / sd).numpy().astype(np.float32) for x in (train, *others)]


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 1000):
    """Multinomial L-BFGS logistic regression on x [N, D], y [N] with inverse regularisation C."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x, y)
    return clf


def logreg_eval(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, cs: list[float] | None = None,
                val_fraction: float = 0.1, sweep_limit: int = 10000, max_iter: int = 1000, seed: int = 0,
                standardise: bool = True) -> dict:
    """C sweep on a validation split, refit on all train, report on test.

    train_x [N, D], train_y [N], test_x [M, D], test_y [M]; unlabelled (< 0) rows are dropped.
    ``sweep_limit`` > 0 caps the number of train rows used during the sweep. ``standardise``: scale
    features by the (sweep / full) train mean and std; turn off when the caller already did.
    Returns {"test_top1", "best_C", "val_top1", "sweep": {C: val acc}, "n_train", "n_test"}.
    """
    cs = list(cs or C_GRID)
    kt, ke = train_y >= 0, test_y >= 0
    train_x, train_y, test_x, test_y = train_x[kt], train_y[kt], test_x[ke], test_y[ke]
    if len(train_y) < 2 or len(test_y) == 0:
        raise ValueError("logistic regression needs labelled train (>= 2) and test images")
    tr, va = split_train_val(train_y, val_fraction, seed)
    if sweep_limit and len(tr) > sweep_limit:
        g = torch.Generator().manual_seed(seed)
        tr = tr[torch.randperm(len(tr), generator=g)[:sweep_limit]].sort().values
    sweep = {}
    if len(cs) > 1 and len(va):
        xs_tr, xs_va = _standardise(train_x[tr], train_x[va], on=standardise)
        for c in cs:
            clf = fit_logreg(xs_tr, train_y[tr].numpy(), c, max_iter)
            sweep[c] = float((clf.predict(xs_va) == train_y[va].numpy()).mean() * 100)
        best = max(cs, key=lambda c: (sweep[c], -c))  # ties: the stronger regularisation
    else:
        best = cs[0]
    xa, xt = _standardise(train_x, test_x, on=standardise)
    clf = fit_logreg(xa, train_y.numpy(), best, max_iter)
    acc = float((clf.predict(xt) == test_y.numpy()).mean() * 100)
    return {"test_top1": acc, "best_C": best, "val_top1": sweep.get(best), "sweep": {f"{c:g}": round(v, 2)
            for c, v in sweep.items()}, "n_train": int(len(train_y)), "n_test": int(len(test_y))}
