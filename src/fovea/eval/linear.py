"""DINOv2-style linear probe: a grid of linear heads trained at once on frozen features.

Grid (METHODS.md section 6): 13 learning rates [1e-5 ... 0.1] (scaled by batch/256) x
{CLS of the last 1, last 4 blocks} x {without, with the mean patch token}. SGD with
momentum 0.9, no weight decay, cosine schedule. Every head sees the same mini-batches; the
best head on a validation split carved from train is reported on test. Features are cached
frozen features (no augmentation), so an epoch costs a few matrix products.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fovea.eval.bank import FeatureBank, split_train_val

LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
#: feature configurations of the grid (CLS of the last 1 or 4 blocks, with or without the mean patch)
FEATURE_GRID = ("last1", "last1+mean", "last4", "last4+mean")


def grid_features(bank: FeatureBank, configs: list[str]) -> dict[str, Tensor]:
    """Feature matrices of the grid's configurations: {name: [N, D_name]}.

    last1: final CLS [N, D]; last1+mean: CLS and mean patch [N, 2D]; last4: CLS of the last 4
    blocks [N, 4D]; last4+mean: [N, 5D]. For a bank without CLS (``has_cls=False``, I-JEPA) the
    "CLS" of a block is its mean patch token, so last1 / last4 are the mean patch of the last 1 / 4 blocks.
    """
    out = {}
    for c in configs:
        if c == "last1":
            out[c] = bank.get("cls")
        elif c == "last1+mean":
            out[c] = torch.cat([bank.get("cls"), bank.get("mean_patch")], 1)
        elif c == "last4":
            out[c] = bank.get("cls_last4")
        elif c == "last4+mean":
            out[c] = bank.get("cls_last4_mean")
        else:
            raise ValueError(f"unknown linear-probe feature config {c!r}; choose from {list(FEATURE_GRID)}")
    return out


def train_linear_grid(feats: dict[str, Tensor], labels: Tensor, num_classes: int, lrs: list[float],
                      epochs: int = 10, batch_size: int = 1024, momentum: float = 0.9, seed: int = 0,
                      progress: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """Train one linear head per (config, lr) with SGD + cosine lr, all on the same batches.

    feats {name: [N, D_name]}, labels [N] in [0, num_classes). ``lrs`` are base values, scaled by
    batch_size / 256. Returns {name: (weights [L, D_name, C], biases [L, C])} with L = len(lrs).
    """
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    lr = torch.tensor(lrs, dtype=torch.float32) * batch_size / 256.0
    heads = {}
    for name, x in feats.items():
        w = torch.zeros(len(lrs), x.shape[1], num_classes)
        torch.nn.init.normal_(w, std=0.01, generator=g)
        heads[name] = [w.requires_grad_(), torch.zeros(len(lrs), num_classes, requires_grad=True)]
    bufs = {name: [torch.zeros_like(p) for p in ps] for name, ps in heads.items()}
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in tqdm(range(epochs), desc="linear probe", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=g)
        for lo in range(0, n, batch_size):
            idx = perm[lo:lo + batch_size]
            y = labels[idx]
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            for name, (w, b) in heads.items():
                logits = torch.einsum("bd,ldc->lbc", feats[name][idx], w) + b[:, None]
                # sum over heads of the mean CE: each head gets its own gradient, unscaled by L
                loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(len(lrs)), reduction="sum") / len(y)
                gw, gb = torch.autograd.grad(loss, [w, b])
                with torch.no_grad():
                    for p, gp, buf in ((w, gw, bufs[name][0]), (b, gb, bufs[name][1])):
                        buf.mul_(momentum).add_(gp)
                        p.sub_(buf * (lr * scale).view(-1, *([1] * (p.ndim - 1))))
            step += 1
    return {name: (w.detach(), b.detach()) for name, (w, b) in heads.items()}


def grid_accuracy(heads: dict[str, tuple[Tensor, Tensor]], feats: dict[str, Tensor], labels: Tensor,
                  classes: list[int] | None = None) -> dict[str, Tensor]:
    """Top-1 accuracy (%) of every head: {name: [L]} on feats {name: [M, D]} and labels [M]; with
    ``classes`` the argmax runs over those classes' logits only (:mod:`fovea.eval.subset`)."""
    from fovea.eval.subset import restricted_argmax
    out = {}
    for name, (w, b) in heads.items():
        pred = restricted_argmax(torch.einsum("bd,ldc->lbc", feats[name], w) + b[:, None], classes)
        out[name] = (pred == labels[None]).float().mean(1) * 100
    return out


def linear_probe(train: FeatureBank, test: FeatureBank, configs: list[str] | None = None,
                 lrs: list[float] | None = None, epochs: int = 10, batch_size: int = 1024,
                 val_fraction: float = 0.1, seed: int = 0, progress: bool = False,
                 test_classes: list[int] | None = None, test_labels: str = "subset") -> dict:
    """Grid-train on train minus a stratified validation split, select on it, report on test.

    ``test_classes``: the test set's classes are these training classes only (ImageNet-A / -R): its
    labels are mapped to training classes (``test_labels``, see :func:`fovea.eval.subset.to_train_labels`)
    and the test logits restricted to them before the argmax; validation keeps every class.

    Returns {"test_top1", "val_top1", "best": {"features", "lr"}, "grid": {name: {lr: val acc}},
    "test_grid": {name: test acc of the name's best-val lr}, "n_train", "n_val", "n_test"}.
    """
    # without a CLS token (I-JEPA) the grid is the mean patch token of the last 1 or 4 blocks
    configs = configs or (list(FEATURE_GRID) if train.has_cls else ["last1", "last4"])
    lrs = list(lrs or LR_GRID)
    keep_tr, keep_te = train.labels >= 0, test.labels >= 0
    train, test = train.subset(keep_tr.nonzero().flatten()), test.subset(keep_te.nonzero().flatten())
    if len(train) < 2 or len(test) == 0:
        raise ValueError("the linear probe needs labelled train (>= 2) and test images")
    if test_classes is not None:
        from fovea.eval.subset import check_classes, to_train_labels
        check_classes(test_classes, int(train.labels.max()) + 1)
        test = FeatureBank(test.cls, test.mean_patch, test.registers, to_train_labels(test.labels, test_classes,
                           test_labels), test.has_cls)
    c = int(max(train.labels.max(), test.labels.max())) + 1
    tr_idx, va_idx = split_train_val(train.labels, val_fraction, seed)
    if len(va_idx) == 0:
        raise ValueError("validation split is empty: raise val_fraction or use more train images")
    ftr, fte = grid_features(train, configs), grid_features(test, configs)
    fit = {k: v[tr_idx] for k, v in ftr.items()}
    val = {k: v[va_idx] for k, v in ftr.items()}
    heads = train_linear_grid(fit, train.labels[tr_idx], c, lrs, epochs, batch_size, seed=seed, progress=progress)
    val_acc = grid_accuracy(heads, val, train.labels[va_idx])
    test_acc = grid_accuracy(heads, fte, test.labels, test_classes)
    best_name, best_i, best_val = None, 0, -1.0
    for name in configs:  # ties: the earlier config / smaller lr
        i = int(val_acc[name].argmax())
        if float(val_acc[name][i]) > best_val:
            best_name, best_i, best_val = name, i, float(val_acc[name][i])
    assert best_name is not None
    return {"test_top1": float(test_acc[best_name][best_i]), "val_top1": best_val,
            "best": {"features": best_name, "lr": lrs[best_i]},
            "grid": {n: {f"{lr:g}": round(float(a), 2) for lr, a in zip(lrs, val_acc[n])} for n in configs},
            "test_grid": {n: round(float(test_acc[n][int(val_acc[n].argmax())]), 2) for n in configs},
            "n_train": len(tr_idx), "n_val": len(va_idx), "n_test": len(test), "epochs": epochs,
            **({"test_classes": len(test_classes)} if test_classes is not None else {})}
