"""Tiny SPair-layout folders for the correspondence tests (imported by the test modules of this folder)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def textured(w: int, h: int, seed: int) -> np.ndarray:
    """A random uint8 RGB image [h, w, 3] with texture at every scale (noise blocks of 1, 2 and 4 px)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w, 3), np.float64)
    for s in (1, 2, 4):
        n = rng.random(((h + s - 1) // s, (w + s - 1) // s, 3))
        out += np.kron(n, np.ones((s, s, 1)))[:h, :w]
    return (out / 3 * 255).astype(np.uint8)


def write_pair(root: Path, name: str, rec: dict, split: str = "test") -> Path:
    d = root / "PairAnnotation" / split
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"{name}.json"
    f.write_text(json.dumps(rec))
    return f


def save(root: Path, cat: str, name: str, img: np.ndarray) -> None:
    d = root / "JPEGImages" / cat
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(d / name)  # PNG bytes whatever the name: decode_image reads them


def make_spair(root: Path) -> Path:
    """Two categories: 'cat' has 2 pairs (identity copy and a x2 nearest-upsampled copy, non-square),
    'dog' 1 pair (identity copy). Keypoints on a grid, true target points exact. Extra SPair keys."""
    pts = np.array([[x, y] for x in (5, 12, 18) for y in (6, 20, 33)], np.float64)  # 9 points in 24 x 40
    a = textured(24, 40, 0)
    save(root, "cat", "a.jpg", a)
    save(root, "cat", "a2.jpg", np.kron(a, np.ones((2, 2, 1), np.uint8)))  # 48 x 80, x' = 2x + 0.5
    b = textured(24, 40, 1)
    save(root, "dog", "b.jpg", b)
    save(root, "dog", "b_copy.jpg", b.copy())
    extra = {"filename": "x", "src_imsize": [24, 40, 3], "viewpoint_variation": 0, "mirror": 0, "kps_ids": []}
    box = [0, 0, 23, 39]
    write_pair(root, "000001-a-a:cat", {**extra, "src_imname": "a.jpg", "trg_imname": "a.jpg", "category": "cat",
                                        "src_kps": pts.tolist(), "trg_kps": pts.tolist(), "src_bndbox": box,
                                        "trg_bndbox": box})
    write_pair(root, "000002-a-a2:cat", {**extra, "src_imname": "a.jpg", "trg_imname": "a2.jpg", "category": "cat",
                                         "src_kps": pts.tolist(), "trg_kps": (2 * pts + 0.5).tolist(),
                                         "src_bndbox": box, "trg_bndbox": [0, 0, 47, 79]})
    write_pair(root, "000003-b-b:dog", {**extra, "src_imname": "b.jpg", "trg_imname": "b_copy.jpg", "category": "dog",
                                        "src_kps": pts[:4].tolist(), "trg_kps": pts[:4].tolist(), "src_bndbox": box,
                                        "trg_bndbox": box})
    return root
