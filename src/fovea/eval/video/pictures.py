"""Report pictures of the video protocol: a strip of a few frames of a sequence with the propagated mask
overlaid (top row) and, where the frame is annotated, the ground truth (bottom row); frame 0's
prediction is the given mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fovea.eval.video.data import Sequence, default_palette, read_frame, read_mask
from fovea.eval.video.metrics import boundary_map


def overlay(img: np.ndarray, labels: np.ndarray, palette: tuple[int, ...] | None, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 [H, W, 3] with index map [H, W] blended in (objects > 0 and < 255 in their palette
    colour at ``alpha``, their boundaries opaque) -> RGB uint8 [H, W, 3]."""
    pal = np.asarray(palette if palette is not None else default_palette(), dtype=np.float32).reshape(-1, 3)
    out = img.astype(np.float32)
    for k in np.unique(labels):
        if k == 0 or k == 255:
            continue
        m = labels == k
        out[m] = (1 - alpha) * out[m] + alpha * pal[k]
        out[boundary_map(m)] = pal[k]
    return out.clip(0, 255).astype(np.uint8)


def pick_frames(n_frames: int, n_show: int = 5) -> list[int]:
    """``n_show`` evenly spaced frame indices from 0 to n_frames - 1 (all when fewer)."""
    if n_frames <= n_show:
        return list(range(n_frames))
    return sorted({int(round(i)) for i in np.linspace(0, n_frames - 1, n_show)})


def sequence_strip(seq: Sequence, pred_dir: Path, out: Path, n_show: int = 5, height: int = 160,
                   pad: int = 4) -> Path:
    """Write the strip of sequence ``seq`` (predictions read from ``pred_dir/<seq>/``) to ``out``."""
    import cv2
    from PIL import Image
    annotated = {a.stem: a for a in seq.annotations}
    h = min(height, seq.height)
    w = max(1, int(round(seq.width * h / seq.height)))
    picks = pick_frames(len(seq.frames), n_show)
    rows: list[list[np.ndarray]] = [[], []]
    for i in picks:
        f = seq.frames[i]
        img = read_frame(f)
        pred = read_mask(pred_dir / seq.name / seq.result_name(f))
        rows[0].append(overlay(img, pred, seq.palette))
        gt = annotated.get(f.stem)
        rows[1].append(overlay(img, read_mask(gt), seq.palette) if gt is not None else np.zeros_like(img))
    if not any(seq.frames[i].stem in annotated for i in picks[1:]):
        rows = rows[:1]  # no ground truth beyond frame 0: the prediction row alone
    small = [[cv2.resize(x, (w, h), interpolation=cv2.INTER_AREA) for x in r] for r in rows]
    n = len(small[0])
    canvas = np.full((len(small) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(small):
        for c, x in enumerate(row):
            canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out)
    return out
