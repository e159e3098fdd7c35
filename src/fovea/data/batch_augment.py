"""Batched multi-crop augmentation on uint8 tensors (``crops.augment=batched``), in plain torch.

The loader sends every image decoded on a fixed square uint8 canvas with its true size
(:class:`~fovea.data.loader.CanvasDataset`); :class:`BatchedMultiCrop` turns the whole batch into the
multi-crop views on the training device with the recipe of :class:`~fovea.data.augment.MultiCrop`
(albumentations, METHODS.md section 0): per crop RandomResizedCrop -> HorizontalFlip -> ColorJitter
(the four ops in a random order) -> ToGray -> GaussianBlur -> Solarize, with the probabilities of
:class:`~fovea.data.augment.CropsConfig` exactly as ``_pipeline`` uses them.

Randomness. Every random number is ``U(train seed, epoch, index, crop number, draw number)``: a
SplitMix64-style counter hash evaluated in int64 torch ops (with masked right shifts, as int64 ``>>`` is
arithmetic), its top 53 bits giving a float64 uniform in [0, 1). The parameters (a few dozen numbers per
crop) are drawn on the CPU in float64 and only then moved to the device, so the boxes, flips and colour
draws of an image are bit-identical whatever batch it is in, its position in it, the rank, the device or a
resume. They are not albumentations' numbers (impossible), but draws from the same distributions. The
pixel arithmetic runs on the device in float32 holding integer values and rounds (or truncates) after every
operation as albumentations / OpenCV do on uint8 images; CPU and GPU may differ by one grey level where a
value falls on a rounding boundary.

Operations, each matched to the albumentations / OpenCV code it replaces:

- RandomResizedCrop: torchvision's up-to-10 attempts (area fraction ~ U(scale), log aspect ratio ~
  U(log ratio), sides rounded, the first that fits; position uniform over the integer offsets; else the
  central crop with the ratio clamped), then ``cv2.resize`` of the cropped region: a separable resampling
  with OpenCV's source coordinates ``(i + 0.5) * box / S - 0.5`` and its kernels (bicubic a = -0.75,
  bilinear; area: box averaging when both sides shrink), whose taps are clamped inside the box, so no pixel
  outside the box (neither a neighbour nor the canvas padding) has a weight. It runs as two batched
  matmuls with dense per-crop resampling matrices (``rows @ image @ columns^T``: about 3 x 2 S C (C + S)
  flops per crop on a C-px canvas, a small fraction of the model's step); the horizontal flip is folded
  into the column matrix.
- ColorJitter (``adjust_*_torchvision``): brightness ``trunc(x * f)``; contrast ``trunc(x * f + m (1 - f))``
  with ``m`` the mean of the uint8 grey image; saturation ``round(x f + grey (1 - f))``; hue by the uint8
  RGB -> HSV of OpenCV (H in [0, 180)), ``H' = trunc((H + 180 f) mod 180)``, HSV -> RGB; all saturating.
  The random order: at each of the 4 positions every op is applied to the images that have it there.
- ToGray: OpenCV's uint8 ITU-R 601 grey ``(9798 R + 19235 G + 3735 B + 2^14) >> 15``, on the 3 channels.
- GaussianBlur: sigma ~ U(blur_sigma), kernel size ``int(3.5 sigma) * 2 + 1`` (albumentations'
  ``blur_limit=0``), normalised 1-D kernel, separable, reflect-101 borders (``cv2.sepFilter2D``).
- Solarize: ``255 - x`` where ``x >= 128``.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fovea.data.augment import CropsConfig

# ---------------------------------------------------------------------------------------------- random numbers

N_ATTEMPTS = 10  # RandomResizedCrop attempts
D_AREA, D_RATIO = 0, N_ATTEMPTS  # draws 0..9: area fractions, 10..19: log aspect ratios
D_Y, D_X, D_FLIP = 20, 21, 22
D_JITTER, D_FACTORS, D_ORDER = 23, 24, 28  # jitter applied; 4 factors; 4 sort keys of the op order
D_GRAY, D_BLUR, D_SIGMA, D_SOLARIZE = 32, 33, 34, 35
N_DRAWS = 36

_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(x: int) -> int:
    """The int64 with the low 64 bits of the Python int ``x`` (two's complement)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (``>>`` is arithmetic on negative values: mask the sign copies)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64 step on int64 tensors (wrapping arithmetic): a bijective mix of ``x + golden``."""
    z = x + _i64(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _i64(_MUL1)
    z = (z ^ _srl(z, 27)) * _i64(_MUL2)
    return z ^ _srl(z, 31)


def uniforms(seed: int, keys: Tensor, crops: Tensor, n_draws: int = N_DRAWS) -> Tensor:
    """float64 ``[N, n_draws]`` in [0, 1): ``U(seed, epoch, index, crop, draw)`` for the rows
    ``keys[n] = (epoch, index)``, ``crops[n]`` and every draw number (computed on the CPU)."""
    keys, crops = keys.to("cpu", torch.int64), crops.to("cpu", torch.int64)
    h = splitmix64(torch.tensor(_i64(seed), dtype=torch.int64))
    for part in (keys[:, 0], keys[:, 1], crops):
        h = splitmix64(h + part)
    z = splitmix64(h[:, None] + torch.arange(n_draws, dtype=torch.int64))
    return _srl(z, 11).to(torch.float64) * 2.0 ** -53


def to_dev(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """A small CPU tensor (parameters, indices, tables) on ``device``: through pinned memory and without
    blocking on CUDA, so the host keeps preparing the next operation while the device works."""
    t = t if dtype is None else t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------- parameters

@dataclass
class CropParams:
    """The random parameters of N crops (CPU tensors; row n is crop ``crop[n]`` of batch image ``src[n]``)."""

    src: Tensor  # int64 [N] source image (row of the batch)
    crop: Tensor  # int64 [N] crop number (0, 1: global crops; 2..: local crops)
    box: Tensor  # int64 [N, 4] y0, x0, h, w: the crop box in canvas pixels, inside the true image
    flip: Tensor  # bool [N]
    jitter: Tensor  # bool [N] colour jitter applied
    factors: Tensor  # float64 [N, 4] brightness, contrast, saturation, hue
    order: Tensor  # int64 [N, 4] jitter op (0 brightness, 1 contrast, 2 saturation, 3 hue) at each position
    gray: Tensor  # bool [N]
    blur: Tensor  # bool [N]
    sigma: Tensor  # float64 [N] blur sigma
    solarize: Tensor  # bool [N]


def rrc_boxes(u_area: Tensor, u_ratio: Tensor, u_y: Tensor, u_x: Tensor, height: Tensor, width: Tensor,
              scale: tuple[float, float], ratio: tuple[float, float]) -> Tensor:
    """RandomResizedCrop boxes (torchvision / albumentations rule), int64 [N, 4] = (y0, x0, h, w).

    ``u_area``, ``u_ratio``: [N, attempts] uniforms; ``u_y``, ``u_x``: [N]; ``height``, ``width``: [N] image sizes.
    Attempt k: area ~ U(scale) x H W, aspect ratio = exp(U(log ratio)), w = round(sqrt(area r)),
    h = round(sqrt(area / r)); the first with 0 < w <= W and 0 < h <= H is placed at
    (int((H - h + 1) u_y), int((W - w + 1) u_x)); with none, the central crop with the ratio clamped."""
    H, W = height.to(torch.float64)[:, None], width.to(torch.float64)[:, None]
    area = H * W
    target = scale[0] * area + (scale[1] * area - scale[0] * area) * u_area
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    ar = torch.exp(lo + (hi - lo) * u_ratio)
    w = torch.round(torch.sqrt(target * ar))
    h = torch.round(torch.sqrt(target / ar))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.int64).argmax(dim=1, keepdim=True)
    found = ok.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    H, W = H[:, 0], W[:, 0]
    y0 = torch.floor((H - h + 1) * u_y)
    x0 = torch.floor((W - w + 1) * u_x)
    # fallback: the central crop, the whole image with its aspect ratio clamped into `ratio`
    in_ratio = W / H
    fw = torch.where(in_ratio > ratio[1], torch.round(H * ratio[1]), W)
    fh = torch.where(in_ratio < ratio[0], torch.round(W / ratio[0]), H)
    fy0, fx0 = torch.div(H - fh, 2, rounding_mode="floor"), torch.div(W - fw, 2, rounding_mode="floor")
    box = torch.stack([torch.where(found, y0, fy0), torch.where(found, x0, fx0),
                       torch.where(found, h, fh), torch.where(found, w, fw)], dim=1)
    return box.to(torch.int64)


def jitter_ranges(cfg: CropsConfig) -> tuple[list[float], list[float]]:
    """(low, high) of the brightness, contrast, saturation and hue factors, as ``_pipeline`` sets them."""
    b, c, s, h = cfg.color_jitter
    return [max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], [1 + b, 1 + c, 1 + s, h]


def sample_params(cfg: CropsConfig, seed: int, keys: Tensor, sizes: Tensor, crop_ids: list[int],
                  scale: list[float], blur_p: list[float], solarize_p: list[float]) -> CropParams:
    """Parameters of crops ``crop_ids`` (each with its blur / solarize probability) of every image of the
    batch, crop-major: rows ``[crop_ids[0] of images 0..B-1, crop_ids[1] of images 0..B-1, ...]``."""
    keys, sizes = keys.to("cpu", torch.int64), sizes.to("cpu", torch.int64)
    b, k = keys.shape[0], len(crop_ids)
    src = torch.arange(b).repeat(k)
    crop = torch.tensor(crop_ids, dtype=torch.int64).repeat_interleave(b)
    u = uniforms(seed, keys[src], crop)
    box = rrc_boxes(u[:, D_AREA:D_AREA + N_ATTEMPTS], u[:, D_RATIO:D_RATIO + N_ATTEMPTS], u[:, D_Y], u[:, D_X],
                    sizes[src, 0], sizes[src, 1], (scale[0], scale[1]), (cfg.ratio[0], cfg.ratio[1]))
    lo, hi = (torch.tensor(v, dtype=torch.float64) for v in jitter_ranges(cfg))
    s0, s1 = cfg.blur_sigma
    return CropParams(
        src=src, crop=crop, box=box, flip=u[:, D_FLIP] < cfg.flip_p, jitter=u[:, D_JITTER] < cfg.color_jitter_p,
        factors=lo + (hi - lo) * u[:, D_FACTORS:D_FACTORS + 4], order=torch.argsort(u[:, D_ORDER:D_ORDER + 4], dim=1),
        gray=u[:, D_GRAY] < cfg.grayscale_p,
        blur=u[:, D_BLUR] < torch.tensor(blur_p, dtype=torch.float64).repeat_interleave(b),
        sigma=s0 + (s1 - s0) * u[:, D_SIGMA],
        solarize=u[:, D_SOLARIZE] < torch.tensor(solarize_p, dtype=torch.float64).repeat_interleave(b))


# ---------------------------------------------------------------------------------------------- resampling

def _cubic(t: Tensor, a: float = -0.75) -> Tensor:
    """OpenCV's (and torch's) cubic convolution weights of the taps -1, 0, 1, 2 at fraction ``t``: [..., 4]."""
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    return torch.stack([w0, w1, w2, 1 - w0 - w1 - w2], dim=-1)


def axis_taps(length: Tensor, out: int, interp: str, box_area: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Source taps of ``cv2.resize`` along one axis, from ``length[n]`` pixels to ``out``: (indices int64
    [N, out, T] in [0, length - 1], float64 weights [N, out, T]). Out-of-range taps are clamped (OpenCV's
    replicated border of the cropped region). ``interp="area"``: box averaging on the rows of ``box_area``
    (both sides shrink, as OpenCV decides), its linear 'area' upscaling formula elsewhere."""
    n = length.shape[0]
    ln = length.to(torch.float64)[:, None]
    scale = 1.0 / (out / ln)  # OpenCV: scale_x = 1 / inv_scale_x, inv_scale_x = dsize / ssize
    dx = torch.arange(out, dtype=torch.float64)[None, :]
    if interp in ("bicubic", "bilinear"):
        f = ((dx + 0.5) * scale - 0.5).to(torch.float32)  # computed in float as OpenCV does
        s = torch.floor(f)
        t = (f - s).to(torch.float64)
        s64 = s.to(torch.int64)
        if interp == "bicubic":
            idx, w = s64[..., None] + torch.arange(-1, 3), _cubic(t)
        else:
            idx, w = s64[..., None] + torch.arange(0, 2), torch.stack([1 - t, t], dim=-1)
    elif interp == "area":
        assert box_area is not None
        # upscaling formula (cv2 INTER_AREA when a side grows): linear taps sx, sx + 1
        sx = torch.floor(dx * scale)
        fx = ((dx + 1) - (sx + 1) * (out / ln)).to(torch.float32).to(torch.float64)
        fx = torch.where(fx <= 0, torch.zeros_like(fx), fx - torch.floor(fx))
        last = sx >= ln - 1
        fx, sx = torch.where(last, torch.zeros_like(fx), fx), torch.where(last, ln - 1, sx)
        lin_idx = sx.to(torch.int64)[..., None] + torch.arange(0, 2)
        lin_w = torch.stack([1 - fx, fx], dim=-1)
        # box averaging: overlap of source pixel p with [dx * scale, (dx + 1) * scale], over scale
        n_box = int(torch.ceil(scale.max()).item()) + 1 if n else 1
        beg, end = dx * scale, (dx + 1) * scale
        p = torch.floor(beg)[..., None] + torch.arange(n_box, dtype=torch.float64)
        box_w = (torch.minimum(p + 1, end[..., None]) - torch.maximum(p, beg[..., None])).clamp(min=0) / scale[..., None]
        t_max = max(n_box, 2)
        pad = t_max - 2
        lin_idx = torch.cat([lin_idx, lin_idx[..., -1:].expand(-1, -1, pad)], dim=-1)
        lin_w = torch.cat([lin_w, torch.zeros(n, out, pad, dtype=torch.float64)], dim=-1)
        box_idx = torch.cat([p.to(torch.int64), p[..., -1:].to(torch.int64).expand(-1, -1, t_max - n_box)], dim=-1)
        box_w = torch.cat([box_w, torch.zeros(n, out, t_max - n_box, dtype=torch.float64)], dim=-1)
        sel = box_area[:, None, None]
        idx, w = torch.where(sel, box_idx, lin_idx), torch.where(sel, box_w, lin_w)
    else:
        raise ValueError(f"unknown interpolation {interp!r} (bicubic, bilinear or area)")
    hi = (length.to(torch.int64) - 1)[:, None, None]
    return torch.minimum(idx.clamp(min=0), hi), w


def _fold_duplicates(idx: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Taps clamped onto the same pixel (runs of equal indices: they are non-decreasing) -> their summed weight
    on the first of the run and 0 on the others, summed in float64 here, so the device's scatter adds
    nothing but exact zeros and its result does not depend on the order of the additions."""
    w = w.clone()
    for t in range(idx.shape[-1] - 1, 0, -1):
        same = idx[..., t] == idx[..., t - 1]
        w[..., t - 1] = torch.where(same, w[..., t - 1] + w[..., t], w[..., t - 1])
        w[..., t] = torch.where(same, torch.zeros_like(w[..., t]), w[..., t])
    return idx, w


def resampling_matrices(box: Tensor, flip: Tensor, size: int, interp: str, height: int, width: int,
                        device: torch.device) -> tuple[Tensor, Tensor]:
    """Dense separable resampling matrices of the boxes on a ``height`` x ``width`` canvas: (rows float32
    [N, size, height], columns float32 [N, size, width]) with ``crop = rows @ image @ columns^T``. Each row holds
    the taps of :func:`axis_taps` (clamped inside the box) at their canvas positions, zero elsewhere; the flip
    reverses the column matrix's rows. Built on ``device`` from the small tap tables."""
    y0, x0, h, w = box.unbind(1)
    box_area = (h >= size) & (w >= size) if interp == "area" else None
    iy, wy = _fold_duplicates(*axis_taps(h, size, interp, box_area))
    ix, wx = _fold_duplicates(*axis_taps(w, size, interp, box_area))
    fl = flip[:, None, None]
    ix, wx = torch.where(fl, ix.flip(1), ix), torch.where(fl, wx.flip(1), wx)
    n = box.shape[0]
    rows = torch.zeros(n, size, height, device=device).scatter_add_(
        2, to_dev(iy + y0[:, None, None], device), to_dev(wy, device, torch.float32))
    cols = torch.zeros(n, size, width, device=device).scatter_add_(
        2, to_dev(ix + x0[:, None, None], device), to_dev(wx, device, torch.float32))
    return rows, cols


class _FullFloat32:
    """Matmuls in full float32 inside (no TF32 on CUDA): the pixel values must round as OpenCV's do."""

    def __enter__(self) -> None:
        self.prec = torch.get_float32_matmul_precision()
        self.tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc: object) -> None:
        torch.set_float32_matmul_precision(self.prec)
        torch.backends.cuda.matmul.allow_tf32 = self.tf32


def resize_boxes(images: Tensor, src: Tensor, box: Tensor, flip: Tensor, size: int, interp: str,
                 budget: int = 1 << 26) -> Tensor:
    """Crop ``box[n]`` of ``images[src[n]]`` (uint8 or float32 [B, C, H, W] on the device), resized to ``size`` x ``size``
    as ``cv2.resize`` of the cropped region does, flipped where ``flip``: float32 [N, C, size, size] with
    rounded values in [0, 255]. Two batched matmuls per chunk of rows (``rows @ image @ columns^T``, see
    :func:`resampling_matrices`): no gather, no pixel outside the box is read (its weight is exactly 0)."""
    dev, n, ch = images.device, box.shape[0], images.shape[1]
    height, width = images.shape[-2:]
    out = torch.empty(n, ch, size, size, device=dev)
    x = images.to(torch.float32)
    nb = x.shape[0]
    step = min(nb, max(1, budget // (ch * size * max(height, width))))
    src = src.to("cpu", torch.int64)
    with _FullFloat32():
        lo = 0
        while lo < n:
            hi = min(n, lo + step, (lo // nb + 1) * nb)  # crop-major rows: within one crop's block of images
            s = src[lo:hi]
            first, m = int(s[0]), hi - lo
            if first + m <= nb and bool((s == torch.arange(first, first + m)).all()):
                xs = x[first:first + m]  # consecutive images of the batch: a view, no copy
            else:
                xs = x.index_select(0, to_dev(s, dev))
            rows, cols = resampling_matrices(box[lo:hi], flip[lo:hi], size, interp, height, width, dev)
            t = torch.matmul(rows[:, None], xs)  # [m, C, size, W]
            out[lo:hi] = torch.matmul(t, cols[:, None].transpose(-1, -2)).round_().clamp_(0, 255)
            lo = hi
    return out


# ---------------------------------------------------------------------------------------------- pixel operations
# All take and return float32 [M, 3, S, S] holding integers in [0, 255] (uint8 images), per-image factors [M].

def gray_u8(x: Tensor) -> Tensor:
    """OpenCV's uint8 RGB -> grey (ITU-R 601 weights 0.299, 0.587, 0.114 in 15-bit fixed point), [M, 1, S, S]:
    (9798 R + 19235 G + 3735 B + 2^14) >> 15, exact in float32."""
    return torch.floor((x[:, 0:1] * 9798 + x[:, 1:2] * 19235 + x[:, 2:3] * 3735 + 16384) / 32768)


def _col(v: Tensor, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return to_dev(v, x.device, dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    """``adjust_brightness_torchvision`` on uint8: trunc(clip(x * f)) (its float32 look-up table)."""
    return torch.floor((x * _col(f, x)).clamp_(0, 255))


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    """``adjust_contrast_torchvision`` on uint8: trunc(clip(x * f + mean(grey) * (1 - f))); f = 0 gives the
    rounded mean."""
    mean = gray_u8(x).sum(dim=(1, 2, 3), dtype=torch.float64) / (x.shape[-1] * x.shape[-2])
    fd = to_dev(f, x.device, torch.float64)
    value = (mean * (1 - fd)).to(torch.float32).view(-1, 1, 1, 1)
    out = torch.floor((x * _col(f, x) + value).clamp_(0, 255))
    zero = (fd == 0).view(-1, 1, 1, 1)
    return torch.where(zero, torch.floor(mean + 0.5).to(torch.float32).view(-1, 1, 1, 1).expand_as(x), out)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    """``adjust_saturation_torchvision`` on uint8: cv2.addWeighted(x, f, grey, 1 - f, 0), rounded, saturated."""
    fd = f.to(torch.float64)
    return torch.round(x * _col(fd, x) + gray_u8(x) * _col(1 - fd, x)).clamp_(0, 255)


def _div_table(num: int) -> Tensor:
    """OpenCV's HSV division tables: round(num / i) for i in 1..255, 0 at 0 (int32)."""
    return torch.tensor([0] + [round(num / i) for i in range(1, 256)], dtype=torch.int32)


_SDIV, _HDIV = _div_table(255 << 12), _div_table((180 << 12) // 6)
#: OpenCV HSV -> RGB: which of (v, v (1 - s), v (1 - s h), v (1 - s (1 - h))) each channel takes per sector
_SECTOR_RGB = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def rgb_to_hsv_u8(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """OpenCV's uint8 RGB -> HSV (H in [0, 180), S and V in [0, 255]), int32 [M, S, S] each."""
    r, g, b = x.to(torch.int32).unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    sdiv, hdiv = to_dev(_SDIV, x.device), to_dev(_HDIV, x.device)
    s = (diff * sdiv[v.long()] + (1 << 11)) >> 12
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff.long()] + (1 << 11)) >> 12
    return torch.where(h < 0, h + 180, h), s, v


def hsv_to_rgb_u8(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """OpenCV's uint8 HSV -> RGB (float arithmetic, rounded): float32 [M, 3, S, S]."""
    hh = h.to(torch.float32) * torch.tensor(6.0 / 180, dtype=torch.float32)
    sector = torch.floor(hh)
    frac = hh - sector
    sf = s.to(torch.float32) * torch.tensor(1.0 / 255, dtype=torch.float32)
    vf = v.to(torch.float32) * torch.tensor(1.0 / 255, dtype=torch.float32)
    tab = torch.stack([vf, vf * (1 - sf), vf * (1 - sf * frac), vf * (1 - sf * (1 - frac))])  # [4, M, S, S]
    sec = sector.long().clamp_(0, 5)
    pick = to_dev(_SECTOR_RGB, h.device)[:, sec]  # [3, M, S, S]
    rgb = torch.gather(tab, 0, pick).transpose(0, 1)  # [M, 3, S, S]
    rgb = torch.where((s == 0)[:, None], vf[:, None].expand_as(rgb), rgb)
    return torch.round(rgb * 255).clamp_(0, 255)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """``adjust_hue_torchvision`` on uint8: H' = trunc((H + 180 f) mod 180) in OpenCV's HSV (f = 0: unchanged)."""
    h, s, v = rgb_to_hsv_u8(x)
    fd = f.to("cpu", torch.float64)
    lut = torch.remainder(torch.arange(256, dtype=torch.float64)[None, :] + 180 * fd[:, None], 180).floor()
    m = x.shape[0]
    h2 = torch.gather(to_dev(lut, x.device, torch.int32), 1, h.reshape(m, -1).long()).view_as(h)
    out = hsv_to_rgb_u8(h2, s, v)
    return torch.where(_col(fd == 0, x, torch.bool), x, out)


def _reflect101(n: int, pad: int) -> Tensor:
    """Indices of ``arange(-pad, n + pad)`` reflected into [0, n) without repeating the edge (BORDER_REFLECT_101)."""
    i = torch.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)


def gaussian_kernels(sigma: Tensor) -> Tensor:
    """Per-image 1-D kernels of albumentations' ``GaussianBlur(blur_limit=0)``: size int(3.5 sigma) * 2 + 1,
    exp(-x^2 / 2 sigma^2) normalised; float64 [M, K] centred, zero padded to the largest size K."""
    sigma = sigma.to("cpu", torch.float64)
    half = (sigma * 3.5).floor().to(torch.int64)  # ksize = 2 * half + 1
    k = int(half.max().item()) if sigma.numel() else 0
    xs = torch.arange(-k, k + 1, dtype=torch.float64)[None, :]
    ker = torch.exp(-0.5 * (xs / sigma[:, None]) ** 2) * (xs.abs() <= half[:, None])
    return ker / ker.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur per image (``cv2.sepFilter2D`` with reflect-101 borders), rounded."""
    ker = to_dev(gaussian_kernels(sigma), x.device, torch.float32)
    k = (ker.shape[1] - 1) // 2
    if k == 0:
        return x
    hgt, wid = x.shape[-2:]
    cols = x[..., to_dev(_reflect101(wid, k), x.device)]
    tmp = torch.zeros_like(x)
    for j in range(2 * k + 1):
        tmp.add_(cols[..., j:j + wid] * ker[:, j].view(-1, 1, 1, 1))
    rows = tmp[..., to_dev(_reflect101(hgt, k), x.device), :]
    out = torch.zeros_like(x)
    for j in range(2 * k + 1):
        out.add_(rows[..., j:j + hgt, :] * ker[:, j].view(-1, 1, 1, 1))
    return out.round_().clamp_(0, 255)


def solarize(x: Tensor) -> Tensor:
    """albumentations' ``Solarize(threshold 0.5)`` on uint8: 255 - x where x >= 128."""
    return torch.where(x >= 128, 255 - x, x)


JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (adjust_brightness, adjust_contrast, adjust_saturation,
                                                             adjust_hue)


def _rows(mask: Tensor) -> Tensor:
    return torch.nonzero(mask, as_tuple=False)[:, 0]


def color_ops(x: Tensor, p: CropParams, cfg: CropsConfig) -> Tensor:
    """ColorJitter (random op order per image) -> ToGray -> GaussianBlur -> Solarize, on the rows that draw
    each (in place on ``x``, float32 [N, 3, S, S]; the row sets are computed on the CPU)."""
    dev = x.device
    lo, hi = jitter_ranges(cfg)
    identity = [1.0, 1.0, 1.0, 0.0]
    for pos in range(4):
        for op, fn in enumerate(JITTER_OPS):
            if lo[op] == hi[op] == identity[op]:
                continue  # a jitter range of width 0 at the identity (e.g. no hue on grey images)
            rows = _rows(p.jitter & (p.order[:, pos] == op))
            if rows.numel():
                r = to_dev(rows, dev)
                x[r] = fn(x[r], p.factors[rows, op])
    rows = _rows(p.gray)
    if rows.numel():
        r = to_dev(rows, dev)
        x[r] = gray_u8(x[r]).expand(-1, 3, -1, -1)
    rows = _rows(p.blur)
    if rows.numel():
        r = to_dev(rows, dev)
        x[r] = gaussian_blur(x[r], p.sigma[rows])
    rows = _rows(p.solarize)
    if rows.numel():
        r = to_dev(rows, dev)
        x[r] = solarize(x[r])
    return x


# ---------------------------------------------------------------------------------------------- the batch

class BatchedMultiCrop:
    """Canvas batch -> multi-crop batch, on the batch's device.

    ``batch["images"]`` uint8 [B, 3, C, C] (each image top-left on its canvas), ``batch["sizes"]`` int64 [B, 2]
    (true h, w), ``batch["keys"]`` int64 [B, 2] (epoch, index) -> ``batch["crops"]``: uint8 [B, 3, S, S] tensors
    [global1, global2, local1..localL] (+ the two global crops again at ``extra_global_size``: the same boxes,
    flips and colour draws, for the Gram teacher), as :class:`~fovea.data.augment.MultiCrop` orders them.
    ``images``, ``sizes``, ``keys`` and ``phase`` are removed; other entries (masks, skipped) are kept.
    """

    def __init__(self, cfg: CropsConfig, seed: int, extra_global_size: int = 0) -> None:
        self.cfg, self.seed, self.extra = copy.deepcopy(cfg), seed, extra_global_size
        bp = cfg.effective_blur_p()
        self.global_blur, self.local_blur = [bp[0], bp[1]], bp[2]
        self.global_solarize = [0.0, cfg.solarize_p]

    @property
    def n_crops(self) -> int:
        return 2 + self.cfg.n_local + (2 if self.extra else 0)

    def params(self, keys: Tensor, sizes: Tensor) -> tuple[CropParams, CropParams | None]:
        """(global crops' parameters, local crops' parameters or None), crop-major rows."""
        c = self.cfg
        g = sample_params(c, self.seed, keys, sizes, [0, 1], c.global_scale, self.global_blur, self.global_solarize)
        loc = (sample_params(c, self.seed, keys, sizes, list(range(2, 2 + c.n_local)), c.local_scale,
                             [self.local_blur] * c.n_local, [0.0] * c.n_local) if c.n_local else None)
        return g, loc

    def render(self, images: Tensor, p: CropParams, size: int) -> Tensor:
        """uint8 [N, 3, size, size]: the crops of ``p`` with all their operations."""
        x = resize_boxes(images, p.src, p.box, p.flip, size, self.cfg.interpolation)
        return color_ops(x, p, self.cfg).to(torch.uint8)

    @torch.no_grad()
    def crops(self, images: Tensor, sizes: Tensor, keys: Tensor) -> list[Tensor]:
        b = images.shape[0]
        images = images.to(torch.float32)  # once for all the crop groups
        g, loc = self.params(keys, sizes)
        out = list(self.render(images, g, self.cfg.global_size).split(b))
        if loc is not None:
            out += list(self.render(images, loc, self.cfg.local_size).split(b))
        if self.extra:
            out += list(self.render(images, g, self.extra).split(b))
        return out

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k not in ("images", "sizes", "keys", "phase")}
        out["crops"] = self.crops(batch["images"], batch["sizes"], batch["keys"])
        return out


class PhaseAugment:
    """The stepper's ``augment``: a canvas batch (with its data ``phase``) -> multi-crop batch, by the
    :class:`BatchedMultiCrop` of that phase (built once per phase from ``crops_for(phase)`` = (crops config,
    extra global size)). A batch without ``images`` / ``keys`` (already cropped) passes unchanged."""

    def __init__(self, crops_for: Callable[[str], tuple[CropsConfig, int]], seed: int) -> None:
        self.crops_for, self.seed = crops_for, seed
        self.by_phase: dict[str, BatchedMultiCrop] = {}

    def __call__(self, batch: dict) -> dict:
        if "images" not in batch or "keys" not in batch:
            return batch
        phase = str(batch.get("phase", ""))
        if phase not in self.by_phase:
            crops, extra = self.crops_for(phase)
            self.by_phase[phase] = BatchedMultiCrop(crops, self.seed, extra)
        return self.by_phase[phase](batch)
