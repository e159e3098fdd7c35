"""Nearest-neighbour keypoint transfer between two dense feature maps, and the dense maps themselves.

Coordinate convention (pixel centres): a point (x, y) is in pixel units of its image where the integer
value i is the CENTRE of pixel (column or row) i, so an image W pixels wide spans [-0.5, W - 0.5]. A
resize from W to W' pixels maps centres to centres: ``x' = (x + 0.5) * W' / W - 0.5`` (the geometry of
``cv2.resize`` and of ``F.interpolate(..., align_corners=False)``); the inverse is the same formula with
W and W' swapped. The pixel (or patch cell) holding a point is ``floor(x + 0.5)`` clamped to [0, W - 1].

Matching: both images were resized to S x S; a dense map [D, h, w] (patch tokens: h = S / patch) is
either bilinearly upsampled to S x S (``resolution="pixel"``, align_corners=False) or used as is
(``"patch"``: one cell per patch, a cell's point is its centre). Features are L2-normalised; each source
keypoint takes the feature of the cell holding it and goes to the target cell of highest cosine
similarity (the first in row-major order on ties). The upsampled target map is built a band of rows at a
time, so the memory is bounded (K x D queries against at most ``max_elems`` values at once), never the
(S^2 x S^2) similarity of all pixel pairs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def rescale_points(xy: np.ndarray, from_wh: tuple[float, float], to_wh: tuple[float, float]) -> np.ndarray:
    """Points [K, 2] (x, y) in an image of size ``from_wh`` = (W, H) -> the same points in that image
    resized to ``to_wh`` (pixel-centre convention of the module doc). float64."""
    xy = np.asarray(xy, np.float64)
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    return np.stack([(xy[:, 0] + 0.5) * sx - 0.5, (xy[:, 1] + 0.5) * sy - 0.5], axis=1)


def cell_index(xy: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """Points [K, 2] in a grid of ``wh`` = (W, H) cells -> int64 [K, 2] (column, row) of the cell holding
    each point: floor(x + 0.5), clamped into the grid."""
    idx = np.floor(np.asarray(xy, np.float64) + 0.5).astype(np.int64)
    idx[:, 0] = idx[:, 0].clip(0, wh[0] - 1)
    idx[:, 1] = idx[:, 1].clip(0, wh[1] - 1)
    return idx


def _grid(cols: Tensor, rows: Tensor, out_wh: tuple[int, int]) -> Tensor:
    """grid_sample coordinates (align_corners=False) of the centres of cells (cols, rows) of an out_wh grid."""
    gx = (2.0 * (cols.double() + 0.5) / out_wh[0] - 1.0).float()
    gy = (2.0 * (rows.double() + 0.5) / out_wh[1] - 1.0).float()
    return torch.stack([gx, gy], dim=-1)


def sample_cells(fmap: Tensor, idx: Tensor, out_wh: tuple[int, int]) -> Tensor:
    """Values [K, D] of ``fmap`` [D, h, w] bilinearly upsampled (align_corners=False, border clamp) to
    ``out_wh`` = (W, H) at the cells ``idx`` [K, 2] (column, row). Exact cells when out_wh == (w, h)."""
    d, h, w = fmap.shape
    idx = idx.to(fmap.device)
    if tuple(out_wh) == (w, h):
        return fmap[:, idx[:, 1], idx[:, 0]].T
    g = _grid(idx[:, 0], idx[:, 1], out_wh)[None, None]  # [1, 1, K, 2]
    return F.grid_sample(fmap[None], g, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T


def dense_rows(fmap: Tensor, out_wh: tuple[int, int], r0: int, r1: int) -> Tensor:
    """Rows r0..r1-1 of ``fmap`` [D, h, w] bilinearly upsampled to ``out_wh`` = (W, H): [D, r1 - r0, W]
    (the same values as ``F.interpolate(fmap[None], (H, W), mode="bilinear")`` there)."""
    d, h, w = fmap.shape
    if tuple(out_wh) == (w, h):
        return fmap[:, r0:r1]
    if r0 == 0 and r1 == out_wh[1]:  # the whole map: F.interpolate is faster (same values)
        return F.interpolate(fmap[None], (out_wh[1], out_wh[0]), mode="bilinear", align_corners=False)[0]
    cols = torch.arange(out_wh[0], device=fmap.device)
    rows = torch.arange(r0, r1, device=fmap.device)
    g = _grid(cols[None, :].expand(len(rows), -1), rows[:, None].expand(-1, len(cols)), out_wh)[None]
    return F.grid_sample(fmap[None], g, mode="bilinear", padding_mode="border", align_corners=False)[0]


def best_cells(query: Tensor, fmap: Tensor, out_wh: tuple[int, int], max_elems: int = 1 << 24
               ) -> tuple[Tensor, Tensor]:
    """For each L2-normalised query [K, D]: the cell (column, row) [K, 2] int64 of ``fmap`` [D, h, w]
    upsampled to ``out_wh`` (each cell's feature L2-normalised) of highest cosine similarity, and that
    similarity [K]. Bands of rows of at most ``max_elems`` values are built one at a time."""
    d = fmap.shape[0]
    width, height = out_wh
    step = max(1, max_elems // max(1, width * d))
    best = torch.full((query.shape[0],), -float("inf"), device=fmap.device)
    where = torch.zeros(query.shape[0], dtype=torch.long, device=fmap.device)
    for r0 in range(0, height, step):
        r1 = min(height, r0 + step)
        band = dense_rows(fmap, out_wh, r0, r1).reshape(d, -1)
        norm = torch.linalg.vector_norm(band, dim=0).clamp_min(1e-12)
        s, a = ((query @ band) / norm).max(dim=1)
        better = s > best  # strict: an earlier band wins ties, as argmax over the whole map would
        best = torch.where(better, s, best)
        where = torch.where(better, a + r0 * width, where)
    return torch.stack([where % width, where // width], dim=1), best


def match_points(src_map: Tensor, trg_map: Tensor, src_kps: np.ndarray, src_wh: tuple[int, int],
                 trg_wh: tuple[int, int], out_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Transfer ``src_kps`` [K, 2] (original source pixels; the source image was ``src_wh`` = (W, H))
    through the dense maps [D, h, w] of the resized images, matched on an ``out_wh`` grid (S x S: pixel
    resolution; (w, h): patch resolution) -> predicted points [K, 2] in ORIGINAL target pixels (the
    centre of the best cell mapped back to ``trg_wh``) and their cosine similarities [K]."""
    idx = cell_index(rescale_points(src_kps, src_wh, out_wh), out_wh)
    q = F.normalize(sample_cells(src_map.float(), torch.from_numpy(idx), out_wh), dim=1)
    cells, sim = best_cells(q, trg_map.float(), out_wh)
    pred = rescale_points(cells.cpu().numpy().astype(np.float64), out_wh, trg_wh)
    return pred, sim.cpu().numpy()


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size, 3] with cv2 (area averaging when shrinking both sides, else bilinear)."""
    import cv2
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if (size <= h and size <= w) else cv2.INTER_LINEAR
    return np.ascontiguousarray(cv2.resize(img, (size, size), interpolation=interp))


def pixel_features(x: Tensor, window: int) -> Tensor:
    """Raw-pixel dense features of normalised images x [B, 3, S, S]: each pixel gets the RGB of its
    ``window`` x ``window`` neighbourhood (reflect padding) minus that neighbourhood's per-channel mean ->
    [B, 3 * window^2, S, S] (after L2 normalisation in the matcher: zero-mean normalised
    cross-correlation of patches, blind to a per-channel brightness offset)."""
    b, c, hh, ww = x.shape
    r = window // 2
    xp = F.pad(x, (r, r, r, r), mode="reflect") if r else x
    u = F.unfold(xp, kernel_size=window).reshape(b, c, window * window, hh, ww)
    return (u - u.mean(dim=2, keepdim=True)).reshape(b, c * window * window, hh, ww)
