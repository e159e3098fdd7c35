"""Frozen-feature k-NN classification (METHODS.md section 6).

Features are L2-normalised; each test sample takes its k most similar train samples and
weights their votes by exp(sim / T) (T = 0.07); top-1 accuracy is reported for each k.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fovea.eval.features import available_kinds, extract_features, extract_features_sharded


def knn_classify(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, ks: list[int],
                 temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024,
                 classes: list[int] | None = None) -> dict[int, Tensor]:
    """Predicted labels of test samples for each k.

    train_feats [N, D], train_labels [N] int, test_feats [M, D] (normalised here).
    Returns {k: predictions [M]}. Votes of the k nearest are weighted by exp(sim / temperature);
    with ``classes`` the argmax runs over those classes' votes only (:mod:`fovea.eval.subset`).
    """
    from fovea.eval.subset import restricted_argmax
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    c = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    kmax = min(max(ks), train.shape[0])
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    for lo in range(0, test.shape[0], chunk):
        sims = test[lo:lo + chunk] @ train.T
        top_sim, top_idx = sims.topk(kmax, dim=1)
        top_lab = train_labels[top_idx]
        w = (top_sim / temperature).exp()
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(top_sim.shape[0], c, dtype=w.dtype, device=w.device)
            votes.scatter_add_(1, top_lab[:, :kk], w[:, :kk])
            preds[k].append(restricted_argmax(votes, classes))
    return {k: torch.cat(v) for k, v in preds.items()}


def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 ks: list[int], temperature: float = 0.07, test_classes: list[int] | None = None,
                 test_label_mode: str = "subset") -> dict[int, float]:
    """Top-1 accuracy in percent for each k (labels >= 0 only). ``test_classes``: the test set holds
    these training classes only; its labels are mapped to them (``test_label_mode``, see
    :func:`fovea.eval.subset.to_train_labels`) and votes restricted to them."""
    keep_tr, keep_te = train_labels >= 0, test_labels >= 0
    if not keep_tr.any() or not keep_te.any():
        raise ValueError("k-NN needs labelled train and test sets")
    if test_classes is not None:
        from fovea.eval.subset import check_classes, to_train_labels
        check_classes(test_classes, int(train_labels[keep_tr].max()) + 1)
        test_labels = to_train_labels(test_labels, test_classes, test_label_mode)
    c = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_classify(train_feats[keep_tr], train_labels[keep_tr], test_feats[keep_te], ks, temperature, c,
                         classes=test_classes)
    y = test_labels[keep_te]
    return {k: float((p == y).float().mean() * 100) for k, p in preds.items()}


def parse_widths(spec: str | list, embed_dim: int | None = None) -> list[int]:
    """Nesting widths from ``"12,48,192"`` (absolute) or fractions of D (``"1/16,1/4,1"``, ``"0.25"``).

    When any item holds ``/`` or ``.`` all items are fractions (so ``1`` means D); fractions need
    ``embed_dim``. The result is sorted, de-duplicated, each in [1, D].
    """
    items = [str(x).strip() for x in (spec.split(",") if isinstance(spec, str) else spec) if str(x).strip()]
    fractions = any("/" in it or "." in it for it in items)  # then every item is a fraction ("1" = D)
    if fractions and embed_dim is None:
        raise ValueError(f"widths {items} are fractions: the embedding width D is needed")
    out = []
    for it in items:
        if fractions:
            num, _, den = it.partition("/")
            w = round(float(num) / float(den or 1) * embed_dim)  # type: ignore[operator]
        else:
            w = int(it)
        if w < 1 or (embed_dim is not None and w > embed_dim):
            raise ValueError(f"width {it!r} -> {w} outside [1, {embed_dim or 'D'}]")
        out.append(w)
    return sorted(set(out))


def truncate_features(feats: Tensor, kind: str, width: int) -> Tensor:
    """Matryoshka truncation of pooled features [N, D] (or [N, 2D] for ``both``) to width ``w``.

    ``cls`` / ``mean_patch``: ``x[..., :w]``; ``both``: the first w coordinates of each half
    (CLS, mean patch), each re-normalised, concatenated [N, 2w]. k-NN L2-normalises the result.
    """
    if kind == "both":
        half = feats.shape[1] // 2
        return torch.cat([F.normalize(feats[:, :width], dim=1), F.normalize(feats[:, half:half + width], dim=1)], 1)
    return feats[:, :width]


def evaluate_knn(backbone, train_source, test_source, ks: list[int], temperature: float, kinds: list[str],
                 size: int, device: torch.device, batch_size: int = 256, num_workers: int = 2,
                 mean=None, std=None, progress: bool = True, widths: list[int] | None = None,
                 test_classes: list[int] | None = None, test_label_mode: str = "subset") -> dict:
    """Extract features of both splits once and report k-NN top-1 (%) per feature kind and k.

    ``widths``: also report every kind truncated to each width w (< D) as ``KIND@w``, from the same
    extracted features (Matryoshka truncated-feature k-NN); the full width stays ``KIND``.
    Returns {"features": {kind or kind@w: {"k=20": acc, ...}}, "n_train", "n_test", "skipped"}. For a
    backbone without CLS token, ``cls`` / ``both`` are evaluated as ``mean_patch`` (and reported so).
    """
    res = _evaluate(False, backbone, train_source, test_source, ks, temperature, kinds, size, device, batch_size,
                    num_workers, mean, std, progress, widths, test_classes, test_label_mode)
    assert res is not None
    return res


def evaluate_knn_sharded(backbone, train_source, test_source, ks: list[int], temperature: float, kinds: list[str],
                         size: int, device: torch.device, batch_size: int = 256, num_workers: int = 2,
                         mean=None, std=None, progress: bool = True, widths: list[int] | None = None) -> dict | None:
    """:func:`evaluate_knn` shared by the ranks of the process group: every rank extracts its share of both
    splits (:func:`~fovea.eval.features.extract_features_sharded`) and rank 0 votes and returns the results;
    the other ranks return ``None``. Every rank must call it."""
    return _evaluate(True, backbone, train_source, test_source, ks, temperature, kinds, size, device, batch_size,
                     num_workers, mean, std, progress, widths)


def _evaluate(sharded: bool, backbone, train_source, test_source, ks: list[int], temperature: float,
              kinds: list[str], size: int, device: torch.device, batch_size: int, num_workers: int, mean, std,
              progress: bool, widths: list[int] | None, test_classes: list[int] | None = None,
              test_label_mode: str = "subset") -> dict | None:
    kinds = available_kinds(backbone, kinds)
    mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    extract = extract_features_sharded if sharded else extract_features
    tr = extract(backbone, train_source, size, kinds, device, batch_size, num_workers, mean, std, progress,
                 "k-NN train features")
    te = extract(backbone, test_source, size, kinds, device, batch_size, num_workers, mean, std, progress,
                 "k-NN test features")
    if tr is None or te is None:
        return None
    (ftr, ytr, s1), (fte, yte, s2) = tr, te
    sub: dict[str, Any] = {"test_classes": test_classes, "test_label_mode": test_label_mode}
    res = {kind: {f"k={k}": acc for k, acc in knn_accuracy(ftr[kind], ytr, fte[kind], yte, ks, temperature,
                                                            **sub).items()}
           for kind in kinds}
    dim = backbone.embed_dim
    for w in sorted(set(widths or [])):
        if w >= dim:
            continue  # the full width is KIND itself
        for kind in kinds:
            accs = knn_accuracy(truncate_features(ftr[kind], kind, w), ytr, truncate_features(fte[kind], kind, w), yte,
                                ks, temperature, **sub)
            res[f"{kind}@{w}"] = {f"k={k}": acc for k, acc in accs.items()}
    return {"features": res, "n_train": len(ytr), "n_test": len(yte), "skipped": s1 + s2}
