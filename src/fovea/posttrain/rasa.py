"""RASA: removal of absolute spatial attributes from patch features (METHODS.md section 4).

Algorithm (pure functions on feature tensors): for R rounds, remove from the patch tokens every
2-d subspace found so far, fit ``sigmoid(W x)`` (W [2, D], no bias) to the patch's normalised
(row, col) in [0, 1]^2 with MSE, orthonormalise W's rows by Gram-Schmidt and add their span to
the removed set. The whole chain is one fixed D x D map ``P``; :func:`fold_into_backbone` stores it
as the backbone's ``patch_proj`` so a RASA model is an ordinary backbone.

One deliberate refinement: before Gram-Schmidt, W's rows are projected onto what is still kept
(the range of the current ``P``). Components of W along removed directions do not change its
predictions (the features it was fitted on have none), but removing a direction that leaves the
kept space would re-inject removed content; with this step ``P = I - Q Q^T`` is an orthogonal
projection (symmetric, idempotent) with ``Q`` [D, 2R] orthonormal.

A second one: rounds stop early when the round's position head reaches a held-out R^2 below
``min_head_r2`` (it found no position left; its directions would be fitted noise, and removing
them only costs semantic dimensions). ``min_head_r2 < 0`` runs all rounds like the released code.

Option ``direction="covariance"`` removes the rows of the features/position cross-covariance
instead of the head's weights. The head's weights point where a regressor reads position
(roughly Sigma^-1 c), not where the features vary with position (c), so each round leaves a linear
residue and R^2 decays slowly over rounds; removing span(c_row, c_col) leaves no linear residue
at all on the fit patches.

The driver :func:`run_rasa` (feature extraction over image sources, reports, k-NN) lives in
:mod:`fovea.posttrain.rasa_run`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fovea.models.vit import VisionTransformer


@dataclass
class RasaConfig:
    """Hyper-parameters of the RASA rounds."""

    rounds: int = 9  # number of 2-d subspaces to find and remove (released Franca config: 9)
    steps: int = 100  # L-BFGS iterations of the sigmoid position head per round
    ridge: float = 1e-3  # relative ridge of the closed-form evaluation regressors (x mean diagonal of X^T X)
    min_head_r2: float = 0.01  # stop when a round's head predicts held-out position worse than this (< 0: never)
    direction: str = "head"  # head: the sigmoid head's rows (METHODS/Franca) | covariance: cross-covariance rows
    progress: bool = True  # tqdm bars


@dataclass
class RoundResult:
    """What one round found and how well position can still be predicted afterwards."""

    round: int  # 1-based
    fit_mse: float | None  # final MSE of the sigmoid head on the fit patches (None: covariance direction)
    head_r2: float  # held-out R^2 of the head (covariance direction: of a fresh linear regressor) before removal
    fresh_r2: dict = field(default_factory=dict)  # fresh linear regressor after removal: {row, col, mean}
    basis: Tensor | None = None  # [2, D] orthonormal rows added to the removed set


# ------------------------------------------------------------------------------- geometry

def grid_positions(h: int, w: int) -> Tensor:
    """Normalised (row, col) in [0, 1] of an h x w patch grid in row-major order: [h*w, 2]."""
    rows = torch.arange(h, dtype=torch.float32) / max(h - 1, 1)
    cols = torch.arange(w, dtype=torch.float32) / max(w - 1, 1)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(h * w, 2)


def gram_schmidt(w: Tensor, eps: float = 1e-12) -> Tensor:
    """Orthonormalise the rows of w [K, D] in order (u_0 = w_0/|w_0|, u_1 = w_1 - <w_1,u_0>u_0 normalised, ...).

    Rows that are (numerically) in the span of earlier ones are dropped: returns [K', D], K' <= K.
    """
    out: list[Tensor] = []
    for row in w.double():
        for u in out:
            row = row - (row @ u) * u
        n = row.norm()
        if n > eps * max(float(w.double().abs().max()), 1.0):
            out.append(row / n)
    return torch.stack(out).to(w.dtype) if out else w.new_zeros(0, w.shape[1])


def remove_subspace(x: Tensor, u: Tensor) -> Tensor:
    """x [..., D] minus its components on the orthonormal rows of u [K, D]: ``x - (x u^T) u``."""
    return x - (x @ u.T) @ u


def removal_matrix(bases: list[Tensor], dim: int) -> Tensor:
    """The chain ``remove(u_1); remove(u_2); ...`` as one map P [D, D] acting as ``x -> x @ P.T`` (float64)."""
    p = torch.eye(dim, dtype=torch.float64)
    for u in bases:
        u = u.double()
        p = (torch.eye(dim, dtype=torch.float64) - u.T @ u) @ p
    return p


# ------------------------------------------------------------------------------ regressors

def fit_position_head(x: Tensor, y: Tensor, steps: int = 100, progress: bool = False, desc: str = "fit"
                      ) -> tuple[Tensor, float]:
    """Fit W [2, D] (no bias) so that sigmoid(x W^T) ~ y with MSE, by L-BFGS from W = 0.

    x [N, D] float, y [N, 2] in [0, 1]. Returns (W [2, D] float32, final MSE).
    """
    x32, y32 = x.float(), y.float()
    w = torch.zeros(y.shape[1], x.shape[1], requires_grad=True)
    # one iteration per step() call (for the progress bar); max_eval must leave room for the line search
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=1, max_eval=30, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.mse_loss(torch.sigmoid(x32 @ w.T), y32)
        loss.backward()
        return loss

    prev: float | None = None
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        loss = float(opt.step(closure).detach())  # the loss at the start of this iteration
        bar.set_postfix(mse=f"{loss:.5f}")
        if prev is not None and abs(prev - loss) <= 1e-9 * max(prev, 1e-12):
            break
        prev = loss
    with torch.no_grad():
        final = float(F.mse_loss(torch.sigmoid(x32 @ w.T), y32))
    return w.detach(), final


def r2_score(pred: Tensor, y: Tensor) -> Tensor:
    """Coefficient of determination per output column: 1 - SSE/SST. pred, y [N, K] -> [K]."""
    pred, y = pred.double(), y.double()
    sse = ((y - pred) ** 2).sum(0)
    sst = ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-30)
    return 1 - sse / sst


def ridge_fit(x: Tensor, y: Tensor, ridge: float = 1e-3) -> Tensor:
    """Closed-form linear regression with bias: beta [D+1, K] minimising |[x,1] beta - y|^2 + lam |beta_w|^2.

    ``lam = ridge * mean(diag(X^T X))`` (relative, so the result does not depend on feature scale);
    the bias is not penalised. Solved in float64.
    """
    a = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    g = a.T @ a
    lam = ridge * float(g.diagonal()[:-1].mean())
    reg = torch.full((a.shape[1],), lam, dtype=torch.float64)
    reg[-1] = 0.0
    return torch.linalg.solve(g + torch.diag(reg), a.T @ y.double())


def ridge_predict(beta: Tensor, x: Tensor) -> Tensor:
    """[x, 1] @ beta: x [N, D] -> [N, K] (float64)."""
    return x.double() @ beta[:-1] + beta[-1]


def position_r2(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, ridge: float = 1e-3
                ) -> dict[str, float]:
    """R^2 of a fresh linear (row, col) regressor fitted on train patches, measured on held-out ones.

    x [N, D], y [N, 2]. Returns {"row", "col", "mean"}.
    """
    r2 = r2_score(ridge_predict(ridge_fit(x_train, y_train, ridge), x_test), y_test)
    return {"row": float(r2[0]), "col": float(r2[1]), "mean": float(r2.mean())}


def patch_probe_accuracy(x_train: Tensor, labels_train: Tensor, x_test: Tensor, labels_test: Tensor,
                         ridge: float = 1e-3) -> float:
    """Top-1 (%) of a least-squares linear classifier predicting the image label from ONE patch token.

    x [N, D] patch tokens, labels [N] int >= 0 (the label of each patch's image); closed form on
    one-hot targets (a cheap patch-level semantic probe, not a segmentation probe).
    """
    c = int(max(labels_train.max(), labels_test.max())) + 1
    beta = ridge_fit(x_train, F.one_hot(labels_train.long(), c).double(), ridge)
    pred = ridge_predict(beta, x_test).argmax(1)
    return float((pred == labels_test).double().mean() * 100)


def cross_covariance(x: Tensor, y: Tensor) -> Tensor:
    """Cross-covariance rows C [K, D] = (y - mean y)^T (x - mean x) / N for x [N, D], y [N, K] (float64).

    Removing span(C's rows) leaves no linear covariance between features and targets on these
    samples, so a fresh least-squares regressor (with bias) predicts the constant mean.
    """
    x, y = x.double(), y.double()
    return (y - y.mean(0)).T @ (x - x.mean(0)) / x.shape[0]


# ---------------------------------------------------------------------------------- rounds

def rasa_rounds(x_fit: Tensor, y_fit: Tensor, x_val: Tensor, y_val: Tensor, cfg: RasaConfig,
                on_round: Callable[[RoundResult, Tensor], None] | None = None) -> tuple[Tensor, list[RoundResult]]:
    """Run ``cfg.rounds`` RASA rounds on patch features.

    x_fit [N, D] / y_fit [N, 2]: patches the heads are fitted on (and the fresh evaluation regressor);
    x_val [M, D] / y_val [M, 2]: held-out patches for R^2. ``on_round(result, P)`` is called after
    each round with the accumulated map P [D, D] (float64, ``x -> x @ P.T``).
    Returns (P [D, D] float64, per-round results).
    """
    dim = x_fit.shape[1]
    bases: list[Tensor] = []
    results: list[RoundResult] = []
    p = torch.eye(dim, dtype=torch.float64)
    bar = tqdm(range(1, cfg.rounds + 1), desc="RASA rounds", disable=not cfg.progress)
    for r in bar:
        pf = p.float()
        xf, xv = x_fit.float() @ pf.T, x_val.float() @ pf.T  # every subspace found so far removed
        if cfg.direction == "head":
            w, mse = fit_position_head(xf, y_fit, cfg.steps, cfg.progress, desc=f"RASA round {r}/{cfg.rounds}")
            head_r2: float = float(r2_score(torch.sigmoid(xv @ w.T), y_val).mean())
        elif cfg.direction == "covariance":
            w, mse = cross_covariance(xf, y_fit), None
            head_r2 = position_r2(xf, y_fit, xv, y_val, cfg.ridge)["mean"]
        else:
            raise ValueError(f"unknown RASA direction {cfg.direction!r}; choose head or covariance")
        if head_r2 < cfg.min_head_r2:
            bar.write(f"RASA round {r}: the position head reaches held-out R^2 {head_r2:.4f} < min_head_r2 "
                      f"{cfg.min_head_r2}: no position left to remove; stopping after {r - 1} rounds")
            break
        u = gram_schmidt(w.double() @ p.T)  # only what lies in the kept space (float64 basis [2, D])
        if u.shape[0] == 0:
            bar.write(f"RASA round {r}: position head is zero (nothing left to remove); stopping")
            break
        bases.append(u)
        p = removal_matrix(bases, dim)
        pf = p.float()
        fresh = position_r2(x_fit.float() @ pf.T, y_fit, x_val.float() @ pf.T, y_val, cfg.ridge)
        res = RoundResult(r, mse, head_r2, fresh, u)
        results.append(res)
        bar.set_postfix(fresh_r2=f"{fresh['mean']:.4f}", head_r2=f"{head_r2:.4f}")
        if on_round is not None:
            on_round(res, p)
    return p, results


# ------------------------------------------------------------------------------------ fold

def fold_into_backbone(backbone: VisionTransformer, p: Tensor) -> VisionTransformer:
    """A copy of ``backbone`` whose patch outputs are followed by P [D, D] (``x -> x @ P.T``).

    An existing patch projection P0 is composed (new map = P @ P0); CLS and registers are unchanged.
    The copy has ``cfg.patch_projection = True`` so :func:`fovea.hub.backbone.load_backbone` rebuilds it.
    """
    dim = backbone.embed_dim
    if tuple(p.shape) != (dim, dim):
        raise ValueError(f"projection shape {tuple(p.shape)} does not match the backbone width {dim}")
    old = backbone.patch_proj.double().cpu() if backbone.patch_proj is not None else torch.eye(dim, dtype=torch.float64)
    cfg = dataclasses.replace(backbone.cfg, patch_projection=True)
    new = VisionTransformer(cfg)
    state = {k: v for k, v in backbone.state_dict().items() if k != "patch_proj"}
    state["patch_proj"] = (p.double().cpu() @ old).float()
    new.load_state_dict(state)
    new.to(next(backbone.parameters()).device)
    return new.train(backbone.training)
