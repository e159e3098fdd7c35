"""Tiny folders in the revisitop (roxford5k), user-set and Copydays layouts for the retrieval tests."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fovea.eval.plugin import EvalContext
from fovea.models.vit import ViTConfig, build_vit


def pattern(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    """A distinct uint8 RGB image [h, w, 3]: 4x4 px random colour blocks."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, ((h + 3) // 4, (w + 3) // 4, 3))
    return np.kron(blocks, np.ones((4, 4, 1)))[:h, :w].astype(np.uint8)


def save_jpg(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=98)
    return path


def tiny_ctx(out: Path, batch_size: int = 2) -> EvalContext:
    """A 1-block random ViT (patch 8) on CPU."""
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(arch="vit_tiny", depth=1, embed_dim=48, num_heads=3, patch_size=8, img_size=32))
    return EvalContext(vit.eval(), torch.device("cpu"), batch_size=batch_size, progress=False, out_dir=out)


#: the ground truth of :func:`make_revisited`: query 0 is database image 2 pasted into a noisy frame
#: (bbx = the pasted region); query 1 has no positive at all; query 2 is a copy of image 4
GND = [
    {"bbx": [10.0, 6.0, 66.0, 46.0], "easy": [2], "hard": [5], "junk": [6]},
    {"bbx": [0.0, 0.0, 56.0, 40.0], "easy": [], "hard": [], "junk": [1]},
    {"bbx": [0.0, 0.0, 56.0, 40.0], "easy": [0], "hard": [4], "junk": []},
]


def make_revisited(root: Path, name: str = "roxford5k", n_db: int = 8) -> Path:
    """``root/<name>/jpg/*.jpg`` and ``root/<name>/gnd_<name>.pkl`` (revisitop's layout); returns ``root``."""
    base = root / name
    imlist = [f"db_{i:02d}" for i in range(n_db)]
    for i, stem in enumerate(imlist):
        save_jpg(base / "jpg" / f"{stem}.jpg", pattern(i))
    frame = np.random.default_rng(99).integers(0, 256, (120, 160, 3)).astype(np.uint8)
    frame[6:46, 10:66] = pattern(2)
    save_jpg(base / "jpg" / "q_frame.jpg", frame)
    save_jpg(base / "jpg" / "q_other.jpg", pattern(50))
    save_jpg(base / "jpg" / "q_copy4.jpg", pattern(4))
    cfg = {"imlist": imlist, "qimlist": ["q_frame", "q_other", "q_copy4"], "gnd": GND}
    with open(base / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(cfg, f)
    return root


def make_user_set(root: Path) -> Path:
    """``root/queries``, ``root/database``, ``positives.csv``, ``junk.csv``: query a.jpg = copy of d1.jpg
    (positives d1, d3; junk d2), query b.jpg has no positive."""
    for i in range(5):
        save_jpg(root / "database" / f"d{i}.jpg", pattern(10 + i))
    save_jpg(root / "queries" / "a.jpg", pattern(11))
    save_jpg(root / "queries" / "b.jpg", pattern(60))
    (root / "positives.csv").write_text("query,database\na.jpg,d1.jpg\na.jpg,d3.jpg\n")
    (root / "junk.csv").write_text("query,database\na.jpg,d2.jpg\n")
    return root


def make_copydays(root: Path, n_blocks: int = 3, distractors: int = 2) -> Path:
    """``root/original/NNNN00.jpg``, ``root/strong/NNNNxx.jpg`` (2 copies of block 1, 1 of the others: the
    same picture slightly brightened) and ``root/distractors/``."""
    for b in range(1, n_blocks + 1):
        img = pattern(200 + b, 48, 48)
        save_jpg(root / "original" / f"{b:04d}00.jpg", img)
        for c in range(1, (3 if b == 1 else 2)):
            save_jpg(root / "strong" / f"{b:04d}{c:02d}.jpg", np.clip(img.astype(int) + 6 * c, 0, 255).astype(np.uint8))
    for k in range(distractors):
        save_jpg(root / "distractors" / f"x{k}.jpg", pattern(300 + k, 48, 48))
    return root
