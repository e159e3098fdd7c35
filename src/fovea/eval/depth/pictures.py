"""Report pictures of the depth probe: image | true depth | predicted depth, side by side (PNG)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def colorize(depth: np.ndarray, lo: float, hi: float, valid: np.ndarray | None = None) -> np.ndarray:
    """Depth [H, W] metres -> RGB uint8 [H, W, 3] with the magma colour map over [lo, hi] (near = dark);
    pixels outside ``valid`` (when given) are black."""
    import cv2
    t = np.clip((depth.astype(np.float64) - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = cv2.applyColorMap((t * 255).astype(np.uint8), cv2.COLORMAP_MAGMA)[:, :, ::-1]
    if valid is not None:
        rgb = np.where(valid[:, :, None], rgb, 0)
    return np.ascontiguousarray(rgb.astype(np.uint8))


def depth_panel(img: np.ndarray, gt: np.ndarray, pred: np.ndarray, valid: np.ndarray, path: Path,
                min_height: int = 240) -> Path:
    """Write ``path`` (PNG): RGB image [H, W, 3] uint8 | true depth | predicted depth ([H, W] metres), both
    coloured over the range of the valid true depths (invalid true pixels black), each panel titled;
    enlarged with nearest neighbour to at least ``min_height`` px. Returns ``path``."""
    import cv2
    g = gt[valid]
    lo, hi = (float(g.min()), float(g.max())) if g.size else (float(pred.min()), float(pred.max()))
    panels = [img, colorize(gt, lo, hi, valid), colorize(pred, lo, hi)]
    k = max(1, -(-min_height // img.shape[0]))
    if k > 1:
        panels = [cv2.resize(p, (p.shape[1] * k, p.shape[0] * k), interpolation=cv2.INTER_NEAREST) for p in panels]
    h, w = panels[0].shape[:2]
    bar = 18
    canvas = np.full((h + bar, 3 * w + 8, 3), 255, np.uint8)
    for j, (p, title) in enumerate(zip(panels, ("image", f"true ({lo:.2f}-{hi:.2f} m)", "predicted"))):
        x0 = j * (w + 4)
        canvas[bar:, x0:x0 + w] = p
        cv2.putText(canvas, title, (x0 + 2, bar - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas[:, :, ::-1])
    return path
