"""Tiny DAVIS-2017-layout folders for the video protocol's tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

#: a palette unlike the DAVIS default, to see that results keep the input's palette
PALETTE = tuple([0, 0, 0, 10, 200, 30, 250, 20, 90, 40, 60, 240] + [7] * (768 - 12))


def square_masks(n_frames: int, h: int, w: int, n_objects: int) -> list[np.ndarray]:
    """Index maps uint8 [h, w]: object k a square moving right by one pixel a frame."""
    out = []
    for t in range(n_frames):
        m = np.zeros((h, w), np.uint8)
        for k in range(n_objects):
            y0, x0 = 2 + 10 * k, 3 + t + 12 * k
            m[y0:y0 + 8, x0:x0 + 10] = k + 1
        out.append(m)
    return out


def make_davis(root: Path, seqs: dict[str, int] | None = None, n_frames: int = 5, h: int = 32, w: int = 56,
               palette: tuple[int, ...] = PALETTE, split: str = "val") -> Path:
    """A DAVIS folder: sequences {name: n_objects}, textured frames whose squares carry their own texture."""
    seqs = seqs or {"alpha": 1, "beta": 2}
    rng = np.random.default_rng(0)
    for name, n_obj in seqs.items():
        fdir, adir = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        fdir.mkdir(parents=True)
        adir.mkdir(parents=True)
        bg = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
        for t, m in enumerate(square_masks(n_frames, h, w, n_obj)):
            img = bg.copy()
            img[m > 0] = (200 + 20 * m[m > 0, None]).clip(0, 255)
            Image.fromarray(img).save(fdir / f"{t:05d}.jpg", quality=95)
            im = Image.fromarray(m)
            im.putpalette(list(palette))
            im.save(adir / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("\n".join(seqs) + "\n")
    return root
