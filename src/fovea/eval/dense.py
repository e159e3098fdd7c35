"""Dense protocols on image / mask pairs: linear segmentation and HummingBird in-context
segmentation (METHODS.md section 6), both scored by mIoU.

Images and masks are resized (squashed) to ``size`` x ``size`` (bicubic / nearest); patch
tokens of the last block form a [N, h, w, D] grid. Predictions are upsampled bilinearly to
``size`` and compared with the resized mask; ``ignore_index`` pixels are not scored.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fovea.data.segmentation import IGNORE_INDEX, SegPairSource
from fovea.models.vit import VisionTransformer


def confusion(pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Confusion matrix [C, C] (rows = ground truth) of label maps pred, gt [...] (same shape)."""
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    idx = gt[keep].long() * num_classes + pred[keep].long().clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(cm: Tensor) -> dict:
    """{"miou": %, "pixel_acc": %, "iou": [C] (% or nan for classes absent from both gt and pred)}.

    IoU_c = TP / (TP + FP + FN); the mean runs over classes with a non-empty union.
    """
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    valid = union > 0
    return {"miou": float(iou[valid].mean() * 100) if valid.any() else float("nan"),
            "pixel_acc": float(tp.sum() / cm.sum().clamp_min(1) * 100), "iou": [float(v * 100) for v in iou]}


def mean_iou(pred: Tensor, gt: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """mIoU (%) of label maps pred, gt [...] (see :func:`miou_from_confusion`)."""
    return miou_from_confusion(confusion(pred, gt, num_classes, ignore_index))["miou"]


@torch.no_grad()
def extract_dense(backbone: VisionTransformer, source: SegPairSource, size: int, device: torch.device,
                  batch_size: int = 32, mean: list[float] | tuple = IMAGENET_MEAN,
                  std: list[float] | tuple = IMAGENET_STD, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Patch features [N, h, w, D] (float32, CPU) and masks int64 [N, size, size] of every pair."""
    backbone.eval()
    p = backbone.patch_size
    if size % p:
        raise ValueError(f"dense size {size} must be a multiple of the patch size {p}")
    feats, masks = [], []
    for lo in tqdm(range(0, len(source), batch_size), desc="dense features", disable=not progress, leave=False):
        imgs, ms = [], []
        for i in range(lo, min(lo + batch_size, len(source))):
            img, m = source.load(i)
            imgs.append(cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC))
            ms.append(cv2.resize(m.astype(np.int32), (size, size), interpolation=cv2.INTER_NEAREST))
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous().to(device)
        out = backbone.forward_features(normalize(x, list(mean), list(std))).patches
        feats.append(out.float().cpu().reshape(len(imgs), size // p, size // p, -1))
        masks.append(torch.from_numpy(np.stack(ms)).long())
    return torch.cat(feats), torch.cat(masks)


def patch_label_distribution(masks: Tensor, patch: int, num_classes: int,
                             ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-patch class fractions [N, h, w, C] of masks [N, H, W] (ignored pixels excluded; all-zero
    rows for fully ignored patches)."""
    n, hh, ww = masks.shape
    h, w = hh // patch, ww // patch
    m = masks[:, :h * patch, :w * patch].reshape(n, h, patch, w, patch).permute(0, 1, 3, 2, 4).reshape(n, h, w, -1)
    valid = (m != ignore_index) & (m >= 0) & (m < num_classes)
    onehot = F.one_hot(torch.where(valid, m, 0), num_classes).float() * valid[..., None]
    counts = onehot.sum(3)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def _predict_maps(logits: Tensor, size: int) -> Tensor:
    """Per-patch scores [N, h, w, C] -> label maps [N, size, size] (bilinear upsampling, argmax)."""
    return F.interpolate(logits.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                         align_corners=False).argmax(1)


def linear_segmentation(train_f: Tensor, train_m: Tensor, test_f: Tensor, test_m: Tensor, num_classes: int,
                        epochs: int = 20, lr: float = 1e-3, batch_size: int = 16,
                        ignore_index: int = IGNORE_INDEX, seed: int = 0) -> dict:
    """A linear layer on standardised patch tokens train_f [N, h, w, D], logits upsampled to the
    masks train_m [N, S, S]; AdamW with cosine lr; mIoU on test_f / test_m. Returns miou_from_confusion
    of the test set plus "epochs"."""
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_f.reshape(-1, train_f.shape[-1]).mean(0), train_f.reshape(-1, train_f.shape[-1]).std(0).clamp_min(1e-6)
    head = torch.nn.Linear(train_f.shape[-1], num_classes)
    torch.nn.init.normal_(head.weight, std=0.01, generator=g)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    n, s = train_f.shape[0], train_m.shape[-1]
    total = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for lo in range(0, n, batch_size):
            idx = perm[lo:lo + batch_size]
            logits = head((train_f[idx] - mu) / sd).permute(0, 3, 1, 2)
            up = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(up, train_m[idx].clamp_max(ignore_index), ignore_index=ignore_index)
            if torch.isfinite(loss):  # batches with only ignored pixels give nan
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for lo in range(0, test_f.shape[0], 64):
            pred = _predict_maps(head((test_f[lo:lo + 64] - mu) / sd), test_m.shape[-1])
            cm += confusion(pred, test_m[lo:lo + 64], num_classes, ignore_index)
    return {**miou_from_confusion(cm), "epochs": epochs}


def nearest_neighbours(bank: Tensor, queries: Tensor, k: int, use_faiss: bool = True) -> tuple[Tensor, Tensor, str]:
    """Inner-product top-k of queries [M, D] in bank [N, D] -> (sims [M, k], idx [M, k], backend name).

    Uses a FAISS flat index when faiss is importable, else a chunked torch top-k (same result)."""
    k = min(k, bank.shape[0])
    if use_faiss:
        try:
            import faiss

            faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
            index = faiss.IndexFlatIP(bank.shape[1])
            index.add(np.ascontiguousarray(bank.numpy().astype(np.float32)))
            sims, idx = index.search(np.ascontiguousarray(queries.numpy().astype(np.float32)), k)
            return torch.from_numpy(sims), torch.from_numpy(idx).long(), "faiss"
        except ImportError:
            pass
    top = [(queries[lo:lo + 4096] @ bank.T).topk(k, dim=1) for lo in range(0, queries.shape[0], 4096)]
    return torch.cat([t.values for t in top]), torch.cat([t.indices for t in top]), "torch"


def hummingbird(train_f: Tensor, train_m: Tensor, test_f: Tensor, test_m: Tensor, num_classes: int,
                k: int = 30, temperature: float = 0.02, memory_size: int = 200_000,
                ignore_index: int = IGNORE_INDEX, seed: int = 0, use_faiss: bool = True) -> dict:
    """HummingBird in-context segmentation.

    Memory: up to ``memory_size`` random train patches (L2-normalised features [M, D] with their
    class fractions [M, C]). Each test patch takes its k most cosine-similar memory entries and
    averages their class fractions with softmax(sim / temperature) weights; the per-patch class
    scores [N, h, w, C] are upsampled to the mask size. Returns miou_from_confusion plus "backend".
    """
    n, h, w, d = train_f.shape
    patch = train_m.shape[-1] // h
    dist = patch_label_distribution(train_m, patch, num_classes, ignore_index).reshape(-1, num_classes)
    feats = F.normalize(train_f.reshape(-1, d), dim=1)
    keep = (dist.sum(1) > 0).nonzero().flatten()
    if len(keep) > memory_size:
        g = torch.Generator().manual_seed(seed)
        keep = keep[torch.randperm(len(keep), generator=g)[:memory_size]]
    mem_f, mem_d = feats[keep], dist[keep]
    q = F.normalize(test_f.reshape(-1, d), dim=1)
    sims, idx, backend = nearest_neighbours(mem_f, q, k, use_faiss)
    wts = (sims / temperature).softmax(1)
    scores = (wts[..., None] * mem_d[idx]).sum(1).reshape(test_f.shape[0], h, w, num_classes)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for lo in range(0, test_f.shape[0], 64):
        cm += confusion(_predict_maps(scores[lo:lo + 64], test_m.shape[-1]), test_m[lo:lo + 64], num_classes,
                        ignore_index)
    return {**miou_from_confusion(cm), "backend": backend, "memory": int(len(keep)), "k": k,
            "temperature": temperature}


def infer_num_classes(*masks: Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """1 + the largest label (other than ignore_index) found in the masks [N, H, W]."""
    top = max(int(m[m != ignore_index].max()) if (m != ignore_index).any() else 0 for m in masks)
    return top + 1
