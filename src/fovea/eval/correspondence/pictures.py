"""Report pictures of keypoint transfer: source and target side by side (each scaled to the same
height), a line from every source keypoint to its predicted target point, green when correct and red
when not (at the chosen alpha), the true target keypoint marked by a small white ring."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GREEN, RED, WHITE = (40, 220, 60), (235, 40, 40), (255, 255, 255)


def draw_matches(src: np.ndarray, trg: np.ndarray, src_kps: np.ndarray, pred: np.ndarray, true: np.ndarray,
                 correct: np.ndarray, path: str | Path, height: int = 256, gap: int = 8) -> Path:
    """Write a PNG of uint8 images ``src`` [Hs, Ws, 3] and ``trg`` [Ht, Wt, 3] side by side with the
    matches (points [K, 2] in original pixels of their image; ``correct`` bool [K]); returns the path."""
    ss, st = height / src.shape[0], height / trg.shape[0]
    ws, wt = max(1, round(src.shape[1] * ss)), max(1, round(trg.shape[1] * st))
    canvas = Image.new("RGB", (ws + gap + wt, height), (0, 0, 0))
    canvas.paste(Image.fromarray(src).resize((ws, height), Image.Resampling.BILINEAR), (0, 0))
    canvas.paste(Image.fromarray(trg).resize((wt, height), Image.Resampling.BILINEAR), (ws + gap, 0))
    draw = ImageDraw.Draw(canvas)
    off = ws + gap

    def at(p: np.ndarray, s: float, dx: float) -> tuple[float, float]:  # pixel-centre convention
        return (float(p[0]) + 0.5) * s - 0.5 + dx, (float(p[1]) + 0.5) * s - 0.5

    r = max(2, height // 100)
    for a, b, t, ok in zip(src_kps, pred, true, correct):
        col = GREEN if ok else RED
        pa, pb, pt = at(a, ss, 0), at(b, st, off), at(t, st, off)
        draw.ellipse([pt[0] - r - 1, pt[1] - r - 1, pt[0] + r + 1, pt[1] + r + 1], outline=WHITE)
        draw.line([pa, pb], fill=col, width=max(1, r // 2))
        for q in (pa, pb):
            draw.ellipse([q[0] - r, q[1] - r, q[0] + r, q[1] + r], fill=col)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
