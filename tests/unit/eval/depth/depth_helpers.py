"""Helpers of the depth protocol tests: a tiny NYU folder (BTS / ZoeDepth layout) and a tiny-ViT EvalContext."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from fovea.eval.plugin import EvalContext
from fovea.eval.depth.protocol import OPTIONS
from fovea.models.vit import ViTConfig, build_vit


def scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 [h, w, 3], depth uint16 mm [h, w]): depth grows from the bottom row (1 m) to the top
    (1 + 3 m x a random factor); the image's brightness follows the depth, plus noise."""
    rows = np.linspace(1.0, 0.0, h)[:, None] * np.ones((1, w))
    far = rng.uniform(2.0, 4.0)
    depth_m = 1.0 + far * rows
    img = np.clip(depth_m[:, :, None] / 5.0 * 255 + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
    return img, np.round(depth_m * 1000).astype(np.uint16)


def write_nyu(root: Path, n_train: int = 6, n_test: int = 3, h: int = 32, w: int = 40, fields: int = 3,
              seed: int = 0) -> Path:
    """Write ``root/nyu_train.txt`` / ``nyu_test.txt`` and the pairs (``/scene_a/rgb_00000.jpg
    /scene_a/sync_depth_00000.png 518.8579``; 2 fields when ``fields`` = 2)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(n):
            folder = root / f"{split}_scene"
            folder.mkdir(parents=True, exist_ok=True)
            img, dep = scene(rng, h, w)
            cv2.imwrite(str(folder / f"rgb_{i:05d}.png"), img[:, :, ::-1])
            assert cv2.imwrite(str(folder / f"sync_depth_{i:05d}.png"), dep)
            line = f"/{split}_scene/rgb_{i:05d}.png /{split}_scene/sync_depth_{i:05d}.png"
            lines.append(line + (" 518.8579" if fields == 3 else ""))
        (root / f"nyu_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_ctx(out: Path, depth: int = 1, patch: int = 8) -> EvalContext:
    """A random 48-wide ViT of ``depth`` blocks on CPU."""
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(arch="vit_tiny", depth=depth, embed_dim=48, num_heads=3, patch_size=patch,
                              img_size=32)).eval()
    return EvalContext(vit, torch.device("cpu"), batch_size=4, progress=False, out_dir=out)


def default_opts(data: str, **kw: object) -> dict:
    """The protocol's option defaults, ``data`` and overrides."""
    opts = {o.key: o.kwargs.get("default") for o in OPTIONS}
    opts["data"] = data
    opts.update(kw)
    return opts
