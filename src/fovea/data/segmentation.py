"""Image / mask pairs for dense protocols, and a synthetic segmentation set for tests.

Layout: a folder of images and a parallel folder of PNG label masks with the same relative
paths and stems (``images/a/x.jpg`` <-> ``masks/a/x.png``). Mask pixels are class indices;
``ignore_index`` (255 by default) marks pixels no protocol scores.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fovea.data.decode import decode_image
from fovea.data.sources import _walk_images

IGNORE_INDEX = 255


class SegPairSource:
    """Pairs ``images_dir/**/stem.*`` with ``masks_dir/**/stem.png``; ``load(i) -> (uint8 [H,W,3], int64 [H,W])``."""

    def __init__(self, images_dir: str, masks_dir: str) -> None:
        for d in (images_dir, masks_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"segmentation folder {d!r} does not exist or is not a directory")
        self.images_dir, self.masks_dir = os.path.abspath(images_dir), os.path.abspath(masks_dir)
        self.name = f"seg:{images_dir}:{masks_dir}"
        self.images, self.masks = [], []
        missing = []
        for p in _walk_images(self.images_dir):
            rel = os.path.relpath(p, self.images_dir)
            m = os.path.join(self.masks_dir, os.path.splitext(rel)[0] + ".png")
            if os.path.isfile(m):
                self.images.append(p)
                self.masks.append(m)
            else:
                missing.append(rel)
        if not self.images:
            raise ValueError(f"no image in {images_dir} has a PNG mask of the same stem in {masks_dir}")
        self.missing = missing  # images without a mask (left out)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGB uint8 [H, W, 3], labels int64 [H, W]); the mask is resized (nearest) if its size differs."""
        img = decode_image(self.images[i])
        if img is None:
            raise ValueError(f"unreadable image {self.images[i]}")
        with Image.open(self.masks[i]) as f:
            m: Image.Image = f if f.mode in ("L", "P", "I", "I;16") else f.convert("L")
            if m.size != (img.shape[1], img.shape[0]):
                m = m.resize((img.shape[1], img.shape[0]), Image.Resampling.NEAREST)
            mask = np.asarray(m).astype(np.int64)
        return img, mask


def seg_source_from_spec(path: str) -> SegPairSource:
    """``DIR`` (holding images/ and masks/) or ``IMAGES_DIR:MASKS_DIR`` -> source."""
    if ":" in path:
        a, b = path.split(":", 1)
        return SegPairSource(a, b)
    return SegPairSource(os.path.join(path, "images"), os.path.join(path, "masks"))


# ----------------------------------------------------------------------- synthetic set

#: class -> base RGB colour of the shapes (class 0 is the textured grey background)
SYNTH_COLOURS = {1: (200, 40, 40), 2: (40, 180, 40), 3: (40, 60, 210)}


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random oriented stripes plus noise: float [H, W] in about [-1, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a, f = rng.uniform(0, np.pi), rng.uniform(0.3, 1.2)
    return 0.6 * np.sin(f * (np.cos(a) * xx + np.sin(a) * yy)) + 0.4 * rng.standard_normal((h, w))


def synthetic_pair(rng: np.random.Generator, size: int = 64, n_shapes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One textured-shapes image uint8 [S, S, 3] and its mask uint8 [S, S].

    Background (class 0) is textured grey; each shape (disc or rectangle) has a class drawn
    from SYNTH_COLOURS, so colour decides the label. A 1-px ring around each shape is
    IGNORE_INDEX.
    """
    s = size
    grey = 110 + 35 * _texture(rng, s, s)
    img = np.repeat(grey[..., None], 3, axis=2)
    mask = np.zeros((s, s), np.uint8)
    yy, xx = np.mgrid[0:s, 0:s]
    for _ in range(n_shapes):
        c = int(rng.integers(1, len(SYNTH_COLOURS) + 1))
        cy, cx, r = rng.uniform(0.2 * s, 0.8 * s), rng.uniform(0.2 * s, 0.8 * s), rng.uniform(0.12 * s, 0.25 * s)
        if rng.random() < 0.5:
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            inside, ring = d <= r, (d > r) & (d <= r + 1.5)
        else:
            d = np.maximum(np.abs(yy - cy), np.abs(xx - cx))
            inside, ring = d <= r, (d > r) & (d <= r + 1.5)
        tex = 30 * _texture(rng, s, s)
        img[inside] = np.asarray(SYNTH_COLOURS[c], np.float32) + tex[inside][:, None]
        mask[inside] = c
        mask[ring & (mask == 0)] = IGNORE_INDEX
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_synthetic_segmentation(out_dir: str | Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` synthetic pairs as ``out_dir/images/NNNNN.png`` and ``out_dir/masks/NNNNN.png``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img, mask = synthetic_pair(rng, size)
        Image.fromarray(img).save(out / "images" / f"{i:05d}.png")
        Image.fromarray(mask).save(out / "masks" / f"{i:05d}.png")
    return out
