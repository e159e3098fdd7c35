"""The metrics of the davis2017 evaluator (semi-supervised), as pure functions.

Per object and frame: J = region IoU (void pixels left out; an empty ground truth and an empty
prediction give J = 1) and F = boundary F-measure: the one-pixel boundary maps of both masks (a pixel
is on the boundary when it differs from its right, lower or lower-right neighbour; on the last row only
the right one counts, on the last column only the lower one, the bottom-right pixel never), each dilated
by a disk of radius ceil(0.008 x image diagonal) pixels (a tolerance >= 1 is taken as pixels), precision
= predicted boundary pixels within the dilated true boundary / predicted boundary pixels, recall the
other way round; no predicted and no true boundary gives F = 1, only one of them F = 0.

Per object over frames (first and last frames of the sequence left out): Mean, Recall = fraction of
frames > 0.5, Decay = mean of the first minus mean of the last of 4 overlapping bins
(bin edges round(linspace(1, n, 5)) - 1, bin i = frames edge[i] .. edge[i+1] inclusive).
Over the data set: each figure is the mean over all objects of all sequences; J&F-Mean = (J-Mean +
F-Mean) / 2. Values here are fractions; the protocol reports percent.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

#: the boundary tolerance of the davis2017 evaluator, as a fraction of the image diagonal
BOUND_TH = 0.008


def region_similarity(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> np.ndarray:
    """J per frame of boolean masks gt, pred [T, H, W] (or one [H, W] -> shape [1]); ``void`` [T, H, W]
    pixels are ignored. float64 [T]."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, dtype=bool)
    if gt.ndim == 2:
        gt, pred, keep = gt[None], pred[None], keep[None]
    inter = ((gt & pred) & keep).sum(axis=(-2, -1)).astype(np.float64)
    union = ((gt | pred) & keep).sum(axis=(-2, -1)).astype(np.float64)
    j = np.ones_like(inter)
    np.divide(inter, union, out=j, where=union > 0)
    return j


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a mask [H, W] (see the module doc) -> bool [H, W]."""
    m = mask.astype(bool)
    right = np.zeros_like(m)
    right[:, :-1] = m[:, 1:]
    down = np.zeros_like(m)
    down[:-1, :] = m[1:, :]
    diag = np.zeros_like(m)
    diag[:-1, :-1] = m[1:, 1:]
    b = (m ^ right) | (m ^ down) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def disk(radius: float) -> np.ndarray:
    """Disk structuring element uint8 [2r+1, 2r+1] (r = floor(radius)): offsets with dx^2 + dy^2 <= radius^2."""
    r = int(math.floor(radius))
    d = np.arange(-r, r + 1)
    return ((d[None, :] ** 2 + d[:, None] ** 2) <= radius ** 2).astype(np.uint8)


def boundary_tolerance(height: int, width: int, bound_th: float = BOUND_TH) -> float:
    """The dilation radius in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th x diagonal)."""
    return float(bound_th) if bound_th >= 1 else float(math.ceil(bound_th * math.hypot(height, width)))


def _dilate(b: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    import cv2
    return cv2.dilate(b.astype(np.uint8), kernel).astype(bool)


def boundary_f(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = BOUND_TH) -> np.ndarray:
    """F per frame of boolean masks gt, pred [T, H, W] (or one [H, W]); void pixels are cleared from both
    masks before their boundaries are taken. float64 [T]."""
    gt = gt[None] if gt.ndim == 2 else gt
    pred = pred[None] if pred.ndim == 2 else pred
    out = np.zeros(len(gt), dtype=np.float64)
    kernel = disk(boundary_tolerance(gt.shape[1], gt.shape[2], bound_th))
    for t in range(len(gt)):
        keep = np.ones(gt.shape[1:], bool) if void is None else ~np.asarray(void[t] if void.ndim == 3 else void,
                                                                          dtype=bool)
        bp = boundary_map(pred[t].astype(bool) & keep)
        bg = boundary_map(gt[t].astype(bool) & keep)
        n_p, n_g = int(bp.sum()), int(bg.sum())
        if n_p == 0 and n_g == 0:
            precision = recall = 1.0
        elif n_p == 0:
            precision, recall = 1.0, 0.0
        elif n_g == 0:
            precision, recall = 0.0, 1.0
        else:
            precision = float((bp & _dilate(bg, kernel)).sum()) / n_p
            recall = float((bg & _dilate(bp, kernel)).sum()) / n_g
        out[t] = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return out


def decay_bins(n: int) -> list[tuple[int, int]]:
    """The 4 (start, stop) index ranges of the davis2017 decay over n frames (stop exclusive; bins overlap
    by one frame)."""
    edges = (np.round(np.linspace(1, n, 5) + 1e-10) - 1).astype(np.int64)
    return [(int(edges[i]), int(edges[i + 1]) + 1) for i in range(4)]


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of per-frame values [n] (NaNs ignored; Recall counts values > 0.5)."""
    x = np.asarray(values, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty bins / all-NaN give NaN as in the evaluator
        mean = float(np.nanmean(x)) if len(x) else float("nan")
        recall = float(np.nanmean(x > 0.5)) if len(x) else float("nan")
        if len(x):
            bins = [x[a:b] for a, b in decay_bins(len(x))]
            decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
        else:
            decay = float("nan")
    return mean, recall, decay


def evaluate_sequence(gt: np.ndarray, pred: np.ndarray, n_objects: int, void_index: int = 255,
                      bound_th: float = BOUND_TH) -> dict[int, dict[str, np.ndarray]]:
    """Per-frame J and F of each object 1..n_objects of index maps gt, pred uint8 [T, H, W] over frames
    1..T-2 (first and last left out) -> {obj: {"J": [T-2], "F": [T-2]}}. ``void_index`` pixels of gt are
    void; prediction indices above n_objects are refused (the evaluator's rule)."""
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    extra = int(pred.max(initial=0))
    if extra > n_objects and extra != void_index:
        raise ValueError(f"the prediction has object {extra}, the ground truth only {n_objects}")
    gt, pred = gt[1:-1], pred[1:-1]
    void = gt == void_index
    out = {}
    for k in range(1, n_objects + 1):
        g, p = gt == k, pred == k
        out[k] = {"J": region_similarity(g, p, void), "F": boundary_f(g, p, void, bound_th)}
    return out


#: the figures of the global table, in the evaluator's order
FIGURES = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def object_figures(per_frame: dict[str, np.ndarray]) -> dict[str, float]:
    """{"J": [n], "F": [n]} -> {"J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"} (fractions)."""
    out = {}
    for m in ("J", "F"):
        mean, recall, decay = statistics(per_frame[m])
        out.update({f"{m}-Mean": mean, f"{m}-Recall": recall, f"{m}-Decay": decay})
    return out


def summarise(per_object: dict[str, dict[str, float]]) -> dict[str, float]:
    """Global figures (fractions) from {"<seq>_<obj>": object_figures}: means over objects; J&F-Mean =
    (J-Mean + F-Mean) / 2."""
    if not per_object:
        return {k: float("nan") for k in FIGURES}
    out = {k: float(np.mean([o[k] for o in per_object.values()])) for k in FIGURES[1:]}
    return {"J&F-Mean": (out["J-Mean"] + out["F-Mean"]) / 2, **out}
