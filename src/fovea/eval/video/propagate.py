"""Label propagation of DINO v1's DAVIS evaluation (METHODS.md section 6b).

Frames are resized so the shorter side is ``short_side`` and the longer side is floored to a multiple
of ``multiple`` (DINO: 480 and 64); the first mask goes straight from its own size to the patch grid
(nearest, PIL's rule) as one-hot labels. Each new frame t takes its labels from the first frame (ground
truth, always kept) and the ``n_last`` previous frames (their own soft labels at patch resolution):
affinity exp(cos / temperature) between every target patch and every context patch within a square
window of ``radius`` patches of the same position (radius 0: no window); over all context patches
jointly the values >= the top-k-th are kept (ties kept, as DINO's threshold rule does), normalised to
sum 1, and the soft labels averaged with these weights. For the output the soft labels are upsampled
by the patch size (bilinear), each channel min-max normalised, argmaxed and resized to the frame size
(nearest).

The affinity is computed per target frame and per band of target rows against the source rows within
the window only, so memory stays at ``max_elems`` floats whatever the frame size (DINO builds the full
[n_context, h*w, h*w] matrix). As exp is monotone the top-k are taken on the cosines and only the k kept
values are exponentiated (a softmax of cos / T over them: the same weights); rows whose k-th value is
tied fall back to DINO's threshold rule (all values >= the k-th kept).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def frame_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """DINO's resize rule -> (th, tw): the shorter side (the width when the frame is taller than wide,
    else the height) becomes ``short_side``, the other ``short_side`` x aspect floored to ``multiple``."""
    if height > width:
        return int((short_side * height / width) // multiple * multiple), int(short_side)
    return int(short_side), int((short_side * width / height) // multiple * multiple)


def resize_frame(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [th, tw, 3] (bilinear, cv2 as DINO's reader)."""
    import cv2
    th, tw = size
    return cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Index map uint8 [H, W] -> [th, tw] by nearest neighbour with PIL's pixel-centre rule
    (cv2.INTER_NEAREST_EXACT; plain INTER_NEAREST samples a half pixel off)."""
    import cv2
    th, tw = size
    return cv2.resize(labels, (tw, th), interpolation=cv2.INTER_NEAREST_EXACT)


def first_labels(mask: np.ndarray, size: tuple[int, int], patch: int, n_channels: int) -> Tensor:
    """The first mask uint8 [H, W] (void already 0) -> one-hot float32 [th/p, tw/p, n_channels] on the
    patch grid of a frame resized to ``size`` (th, tw)."""
    small = resize_labels(mask, (size[0] // patch, size[1] // patch))
    return F.one_hot(torch.from_numpy(small.astype(np.int64)), n_channels).float()


def _window(t_rows: Tensor, s_rows: Tensor, w: int, radius: int) -> Tensor:
    """bool [len(t_rows)*w, len(s_rows)*w]: source patch within ``radius`` rows and columns of the target."""
    cols = torch.arange(w, device=t_rows.device)
    ok_r = (t_rows[:, None] - s_rows[None, :]).abs() <= radius  # [rt, rs]
    ok_c = (cols[:, None] - cols[None, :]).abs() <= radius  # [w, w]
    return (ok_r[:, None, :, None] & ok_c[None, :, None, :]).reshape(len(t_rows) * w, len(s_rows) * w)


def _rows_per_chunk(h: int, w: int, n: int, radius: int, max_elems: int) -> int:
    """The largest band of target rows whose affinity [rows*w, n*band*w] holds <= max_elems floats."""
    for rows in range(h, 0, -1):
        band = h if radius <= 0 else min(h, rows + 2 * radius)
        if rows * w * n * band * w <= max_elems:
            return rows
    return 1


def propagate_frame(target: Tensor, ctx_feats: Tensor, ctx_labels: Tensor, topk: int = 5, radius: int = 12,
                    temperature: float = 0.1, max_elems: int = 1 << 24) -> Tensor:
    """Soft labels [h, w, C] of a target frame from its context.

    target [h, w, D] and ctx_feats [n, h, w, D]: L2-normalised features; ctx_labels [n, h, w, C]: (soft)
    labels of the context frames. Each target patch weights the context patches within ``radius``
    (radius <= 0: all) by exp(cos / temperature), keeps the values >= its top-k-th over all n context
    frames jointly, normalises them to sum 1 and averages the labels."""
    h, w, d = target.shape
    n, c = ctx_feats.shape[0], ctx_labels.shape[-1]
    out = torch.empty(h, w, c, dtype=torch.float32, device=target.device)
    rows = _rows_per_chunk(h, w, n, radius, max_elems)
    all_rows = torch.arange(h, device=target.device)
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        s0, s1 = (0, h) if radius <= 0 else (max(0, r0 - radius), min(h, r1 + radius))
        q = target[r0:r1].reshape(-1, d).float()  # [m, D]
        keys = ctx_feats[:, s0:s1].reshape(n, -1, d).float()  # [n, bw, D]
        sim = torch.einsum("md,nkd->mnk", q, keys)  # [m, n, bw] cosines
        if radius > 0:
            sim.masked_fill_(~_window(all_rows[r0:r1], all_rows[s0:s1], w, radius)[:, None, :], float("-inf"))
        sim = sim.reshape(sim.shape[0], -1)  # [m, n*bw], context frames jointly; outside the window -inf
        labels = ctx_labels[:, s0:s1].reshape(-1, c).float()  # [n*bw, C]
        k = min(topk, sim.shape[1])
        vals, idx = sim.topk(min(k + 1, sim.shape[1]), dim=1)  # exp is monotone: the top-k of the cosines
        kth = vals[:, k - 1:k]
        wts = torch.softmax(vals[:, :k] / temperature, dim=1)  # exp(cos / T) normalised; -inf (outside) -> 0
        res = (wts[:, :, None] * labels[idx[:, :k]]).sum(1)  # [m, C]
        # DINO keeps every value >= the k-th: where the (k+1)-th ties it, redo the row with all ties kept
        tied = (vals[:, k] == vals[:, k - 1]) & torch.isfinite(kth[:, 0]) if vals.shape[1] > k else \
            torch.zeros(len(vals), dtype=torch.bool, device=vals.device)
        if bool(tied.any()):
            st = sim[tied]
            aff = torch.where(st >= kth[tied], torch.exp((st - st.max(dim=1, keepdim=True).values) / temperature),
                              torch.zeros_like(st))
            res[tied] = (aff / aff.sum(dim=1, keepdim=True)) @ labels
        out[r0:r1] = res.reshape(r1 - r0, w, c)
    return out


def propagate_sequence(features: Iterable[Tensor], first: Tensor, n_last: int = 7, topk: int = 5,
                       radius: int = 12, temperature: float = 0.1, max_elems: int = 1 << 24) -> Iterator[Tensor]:
    """Soft labels [h, w, C] of frames 1, 2, ... in order.

    ``features`` yields the L2-normalised features [h, w, D] of frames 0, 1, ...; ``first`` [h, w, C] is
    frame 0's one-hot labels. Frame t's context: frame 0 and frames max(1, t - n_last) .. t - 1 with their
    own soft predictions (n_last = 0: frame 0 only)."""
    it = iter(features)
    f0 = next(it)
    queue: deque[tuple[Tensor, Tensor]] = deque(maxlen=max(n_last, 0))
    first = first.to(f0.device)
    for feat in it:
        ctx_f = torch.stack([f0] + [q[0] for q in queue])
        ctx_l = torch.stack([first] + [q[1] for q in queue])
        soft = propagate_frame(feat, ctx_f, ctx_l, topk, radius, temperature, max_elems)
        if n_last > 0:
            queue.append((feat, soft))
        yield soft


def norm_channels(x: Tensor) -> Tensor:
    """Min-max normalise each channel of x [C, H, W] to [0, 1]; channels whose maximum is <= 0 are left
    as they are and a constant positive channel becomes 1 (DINO divides 0 by 0 there)."""
    mx = x.amax(dim=(1, 2), keepdim=True)
    mn = x.amin(dim=(1, 2), keepdim=True)
    span = mx - mn
    scaled = torch.where(span > 0, (x - mn) / span.clamp_min(1e-30), torch.ones_like(x))
    return torch.where(mx > 0, scaled, x)


def to_mask(soft: Tensor, patch: int, height: int, width: int) -> np.ndarray:
    """Soft labels [h, w, C] -> index map uint8 [height, width]: bilinear upsampling by ``patch``,
    per-channel min-max normalisation, argmax, nearest resize to the frame size."""
    up = F.interpolate(soft.permute(2, 0, 1)[None].float(), scale_factor=patch, mode="bilinear",
                       align_corners=False)[0]
    lab = norm_channels(up).argmax(dim=0).to(torch.uint8).cpu().numpy()
    return resize_labels(lab, (height, width))
