"""Global image descriptors of retrieval and copy detection, through :class:`fovea.eval.plugin.EvalContext`.

Image preparation (:class:`ImageList`): decode (``decode_image``), optionally crop to a box, then either
``longer`` (the longer side resized to ``size``, aspect kept, no crop) or ``square`` (squashed to ``size``
x ``size``); both sides rounded to the nearest multiple of the patch size (at least one patch); cv2
INTER_AREA when shrinking, bicubic when enlarging. Images of equal prepared size are batched together
(``ctx.batch_size``), so descriptors do not depend on the batch size.

Descriptors (:class:`DescriptorSpec`): ``cls`` (CLS token after the final norm; the mean patch token without
CLS), ``gem`` (GeM of the last-block patch tokens: (mean clamp(x, 1e-6)^p)^(1/p)) or ``cls+gem`` (both
concatenated, copy detection). Multi-scale: the normalised input also bilinearly resized by 1/sqrt 2 and
1/2 (sides rounded to multiples of the patch size), the descriptors averaged; the caller L2-normalises per
image (DINO v1's script divides the whole batch tensor by its one norm, right only at batch size 1).
``pixels``: the image squashed to ``pixel_size`` squared, flattened to [3 * pixel_size^2] in [0, 1], its mean
subtracted (the raw-pixel baseline; the caller L2-normalises).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fovea.eval.plugin import EvalContext

MULTISCALE = (1.0, 1.0 / math.sqrt(2.0), 0.5)


def round_to(n: float, m: int) -> int:
    """``n`` rounded to the nearest multiple of ``m`` (at least ``m``)."""
    return max(m, int(round(n / m)) * m)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2
    shrink = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def resize_longer(img: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3]: longer side ``size`` (aspect kept), sides rounded to multiples of ``multiple``."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    return _resize(img, round_to(w * s, multiple), round_to(h * s, multiple))


def resize_square(img: np.ndarray, size: int, multiple: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3], S = ``size`` rounded to a multiple of ``multiple`` (aspect not kept)."""
    s = round_to(size, multiple)
    return _resize(img, s, s)


def crop_box(img: np.ndarray, bbx: Sequence[float]) -> np.ndarray | None:
    """The region [x1, y1, x2, y2] (original pixels; rounded as PIL's ``Image.crop`` rounds them, clipped to
    the image) of ``img`` [H, W, 3]; None when under 2 px either way."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return np.ascontiguousarray(img[y1:y2, x1:x2])


def gem(patches: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling of tokens [B, N, D] -> [B, D]: (mean_n clamp(x, eps)^p)^(1/p)."""
    return patches.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def pixel_descriptor(img: np.ndarray, side: int = 32) -> Tensor:
    """Raw-pixel baseline of uint8 [H, W, 3]: squashed to ``side`` x ``side`` (INTER_AREA), flattened to
    float32 [3 * side^2] in [0, 1], minus its mean (not yet L2-normalised)."""
    import cv2
    x = torch.from_numpy(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0)
    x = x.reshape(-1)
    return x - x.mean()


@dataclass(frozen=True)
class DescriptorSpec:
    """What to compute: ``features`` "backbone" | "pixels"; ``kind`` "cls" | "gem" | "cls+gem"; ``gem_p``;
    ``scales`` (1.0,) or :data:`MULTISCALE`; ``pixel_size`` (side of the pixel baseline)."""

    features: str = "backbone"
    kind: str = "cls"
    gem_p: float = 3.0
    scales: tuple[float, ...] = (1.0,)
    pixel_size: int = 32


def backbone_descriptor(ctx: EvalContext, x: Tensor, kind: str, gem_p: float) -> Tensor:
    """Descriptor [B, D'] (float32) of a normalised batch x [B, 3, H, W] (see the module doc for ``kind``)."""
    f = ctx.features(x)
    patches = f.patches.float()
    cls = patches.mean(dim=1) if f.cls is None else f.cls.float()
    if kind == "cls":
        return cls
    if kind == "gem":
        return gem(patches, gem_p)
    if kind == "cls+gem":
        return torch.cat([cls, gem(patches, gem_p)], dim=1)
    raise ValueError(f"unknown descriptor {kind!r} (cls, gem or cls+gem)")


def multiscale_descriptor(ctx: EvalContext, x: Tensor, spec: DescriptorSpec) -> Tensor:
    """Mean over ``spec.scales`` of the descriptors of x [B, 3, H, W] bilinearly resized by each scale
    (sides rounded to multiples of the patch size): [B, D'], not normalised."""
    p = ctx.patch_size
    total: Tensor | None = None
    for s in spec.scales:
        xs = x
        if s != 1.0:
            size = (round_to(x.shape[2] * s, p), round_to(x.shape[3] * s, p))
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        d = backbone_descriptor(ctx, xs, spec.kind, spec.gem_p)
        total = d if total is None else total + d
    assert total is not None
    return total / len(spec.scales)


class ImageList(torch.utils.data.Dataset):
    """Prepared images: item i = (i, uint8 [h, w, 3] or None when unreadable). Images come from ``paths``
    or from an image ``source`` (anything with ``load(i)`` and ``len``); ``boxes`` [N] optional crops
    (x1, y1, x2, y2 or None); ``mode`` "longer" | "square" | "none" (pixels: no resize here)."""

    def __init__(self, paths: Sequence[Path] | None = None, source: Any = None, boxes: Sequence[Any] | None = None,
                 mode: str = "longer", size: int = 224, multiple: int = 16) -> None:
        if (paths is None) == (source is None):
            raise ValueError("give paths or a source")
        self.paths, self.source, self.boxes = paths, source, boxes
        self.mode, self.size, self.multiple = mode, size, multiple

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.source)

    def raw(self, i: int) -> np.ndarray | None:
        """The decoded (cropped) image i, not resized."""
        from fovea.data.decode import decode_image
        img = decode_image(str(self.paths[i])) if self.paths is not None else self.source.load(i)
        if img is not None and self.boxes is not None and self.boxes[i] is not None:
            img = crop_box(img, self.boxes[i])
        return img

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None]:
        img = self.raw(i)
        if img is None or self.mode == "none":
            return i, img
        if self.mode == "square":
            return i, resize_square(img, self.size, self.multiple)
        return i, resize_longer(img, self.size, self.multiple)


def _as_is(item: Any) -> Any:
    return item


def describe(ctx: EvalContext, images: ImageList, spec: DescriptorSpec, desc: str = "descriptors"
             ) -> tuple[Tensor, list[int]]:
    """Descriptors [N, D'] (float32, CPU, NOT normalised; zero rows for unreadable images) and the indices of
    the unreadable images. Images stream through a DataLoader (``ctx.workers``) into per-shape buckets,
    each run as one batch when it holds ``ctx.batch_size`` images (and at the end)."""
    from tqdm import tqdm
    loader = torch.utils.data.DataLoader(images, batch_size=None, shuffle=False, num_workers=ctx.workers,
                                         collate_fn=_as_is)
    rows: dict[int, Tensor] = {}
    bad: list[int] = []
    buckets: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}

    def flush(key: tuple[int, ...]) -> None:
        items = buckets.pop(key)
        x = ctx.to_input(np.stack([im for _, im in items]))
        d = multiscale_descriptor(ctx, x, spec).cpu()
        rows.update({i: d[j] for j, (i, _) in enumerate(items)})

    for i, img in tqdm(loader, total=len(images), desc=desc, disable=not ctx.progress, leave=False):
        if img is None:
            bad.append(int(i))
            continue
        if spec.features == "pixels":
            rows[int(i)] = pixel_descriptor(img, spec.pixel_size)
            continue
        buckets.setdefault(img.shape, []).append((int(i), img))
        if len(buckets[img.shape]) >= ctx.batch_size:
            flush(img.shape)
    for key in list(buckets):
        flush(key)
    dim = next(iter(rows.values())).shape[0] if rows else 1
    out = torch.zeros(len(images), dim)
    for i, r in rows.items():
        out[i] = r
    return out, sorted(bad)


def pca_whitening(x: Tensor, dim: int = 0, eps_ratio: float = 1e-5) -> tuple[Tensor, Tensor]:
    """PCA whitening learned on descriptors x [N, D]: (mean [D], projection [D, d]) such that
    (y - mean) @ projection has identity covariance on x (eigenvalues floored at ``eps_ratio`` x the largest;
    the ``dim`` leading axes kept, 0 = all)."""
    x = x.double()
    mu = x.mean(dim=0)
    xc = x - mu
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    evals = evals.clamp(min=float(evals[0]) * eps_ratio if float(evals[0]) > 0 else 1e-12)
    if dim:
        evals, evecs = evals[:dim], evecs[:, :dim]
    return mu.float(), (evecs / evals.sqrt()).float()
