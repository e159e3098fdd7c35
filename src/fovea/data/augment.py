"""Multi-crop augmentation (METHODS.md section 0) with albumentations (``crops.augment=per_image``; the
batched torch version of the same recipe is :mod:`fovea.data.batch_augment`).

Every sample's crops are a pure function of (seed, epoch, index): each crop pipeline is
re-seeded per sample, so a resumed run or a run split over several ranks sees exactly the
same pixels. Crops are returned as uint8 CHW tensors; normalisation happens on the device
(:func:`normalize`), which keeps the loader cheap and the transfer small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import albumentations as A
import cv2
import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CropsConfig:
    """Multi-crop recipe (the ``crops`` section). Defaults: the DINOv2 224-px recipe."""

    global_size: int = 224  # global crop size in px
    local_size: int = 96  # local crop size in px
    n_local: int = 8  # number of local crops
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # RandomResizedCrop area range of global crops
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # area range of local crops
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio range of crops
    flip_p: float = 0.5  # horizontal flip probability
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8  # colour jitter probability
    grayscale_p: float = 0.2  # grayscale probability
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # blur prob.: global 1, global 2, locals
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur sigma range
    solarize_p: float = 0.2  # solarize probability (global crop 2 only)
    dinov2_inverted_blur: bool = False  # reproduce official DINOv2 code's inverted blur (0.0 / 0.9 / 0.5)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # normalisation mean (RGB)
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # normalisation std (RGB)
    interpolation: Literal["bicubic", "bilinear", "area"] = "bicubic"  # bicubic | bilinear | area
    augment: Literal["per_image", "batched"] = "per_image"  # per_image (albumentations in the loader workers) | batched (the loader only decodes; the same recipe on whole batches on the training device, plain torch; DINO family, I-JEPA stays per image)
    canvas: int = 0  # augment=batched: side of the square uint8 canvas the loader sends (larger images downscaled to fit, smaller ones zero padded, never upscaled); 0 = auto: the longest side of 16 probed images, at most 2 x global_size (or the Gram crop size when larger)

    def effective_blur_p(self) -> list[float]:
        """Blur probabilities actually used for (global 1, global 2, locals)."""
        if self.dinov2_inverted_blur:
            return [1.0 - self.blur_p[0], 1.0 - self.blur_p[1], self.blur_p[2]]
        return list(self.blur_p)


_INTERP = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def _pipeline(cfg: CropsConfig, size: int, scale: list[float], blur_p: float, solarize_p: float) -> A.Compose:
    b, c, s, h = cfg.color_jitter
    ops: list[A.BasicTransform] = [
        A.RandomResizedCrop((size, size), scale=tuple(scale), ratio=tuple(cfg.ratio),
                            interpolation=_INTERP[cfg.interpolation]),
        A.HorizontalFlip(p=cfg.flip_p),
    ]
    if cfg.color_jitter_p > 0:
        ops.append(A.ColorJitter(brightness=(max(0.0, 1 - b), 1 + b), contrast=(max(0.0, 1 - c), 1 + c),
                                 saturation=(max(0.0, 1 - s), 1 + s), hue=(-h, h), p=cfg.color_jitter_p))
    if cfg.grayscale_p > 0:
        ops.append(A.ToGray(num_output_channels=3, p=cfg.grayscale_p))
    if blur_p > 0:
        ops.append(A.GaussianBlur(blur_limit=0, sigma_limit=tuple(cfg.blur_sigma), p=blur_p))
    if solarize_p > 0:
        ops.append(A.Solarize(threshold_range=(0.5, 0.5), p=solarize_p))  # threshold 128 on uint8
    return A.Compose(ops, seed=0)


class MultiCrop:
    """Image HxWx3 uint8 -> [global1, global2, local1..localL] uint8 tensors [3, S, S].

    ``extra_global_size`` > 0 appends the two global crops again at that size: the same boxes, flips and
    colour operations (the pipelines draw the same random numbers from the same seeds), only resized to
    another size, e.g. the larger input of DINOv3's Gram teacher.
    """

    def __init__(self, cfg: CropsConfig, extra_global_size: int = 0) -> None:
        self.cfg = cfg
        bp = cfg.effective_blur_p()
        self.global1 = _pipeline(cfg, cfg.global_size, cfg.global_scale, bp[0], 0.0)
        self.global2 = _pipeline(cfg, cfg.global_size, cfg.global_scale, bp[1], cfg.solarize_p)
        self.local = _pipeline(cfg, cfg.local_size, cfg.local_scale, bp[2], 0.0) if cfg.n_local else None
        self.extra = ((_pipeline(cfg, extra_global_size, cfg.global_scale, bp[0], 0.0),
                       _pipeline(cfg, extra_global_size, cfg.global_scale, bp[1], cfg.solarize_p))
                      if extra_global_size else ())

    @property
    def n_crops(self) -> int:
        return 2 + self.cfg.n_local + len(self.extra)

    def __call__(self, img: np.ndarray, seed: int) -> list[Tensor]:
        out = []
        for k, pipe in enumerate((self.global1, self.global2)):
            pipe.set_random_seed(seed * 4 + k)
            out.append(pipe(image=img)["image"])
        if self.local is not None:
            self.local.set_random_seed(seed * 4 + 2)
            out.extend(self.local(image=img)["image"] for _ in range(self.cfg.n_local))
        for k, pipe in enumerate(self.extra):
            pipe.set_random_seed(seed * 4 + k)
            out.append(pipe(image=img)["image"])
        return [torch.from_numpy(np.ascontiguousarray(o.transpose(2, 0, 1))) for o in out]


def normalize(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised, on x's device."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s


def eval_transform(img: np.ndarray, size: int) -> Tensor:
    """Evaluation view: resize the shorter side to size/0.875 and centre-crop ``size`` (uint8 CHW).

    Images already at ``size`` (or smaller than it, like 28/32-px sets at their native size)
    are only resized, not cropped, so small datasets are evaluated on whole images.
    """
    h, w = img.shape[:2]
    if max(h, w) <= size or (h == w and h <= size / 0.875):
        out = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC) if (h, w) != (size, size) else img
    else:
        short = int(round(size / 0.875))
        r = short / min(h, w)
        nh, nw = max(size, int(round(h * r))), max(size, int(round(w * r)))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC if r > 1 else cv2.INTER_AREA)
        y, x = (nh - size) // 2, (nw - size) // 2
        out = img[y:y + size, x:x + size]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
