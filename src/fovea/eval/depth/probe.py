"""The DINOv2 linear depth probe (METHODS.md section 6b): frozen-backbone features, one 1x1 convolution to
bin scores, bin-weighted depth, trained with SigLoss.

Features of an image [B, 3, H, W] (H, W multiples of the patch size p; grid h = H / p, w = W / p):

- ``lin1``: the last block's patch tokens (after the final norm) each concatenated with the CLS token of that
  block -> [B, 2D, h, w];
- ``lin4``: the same for 4 evenly spaced blocks, concatenated -> [B, 8D, h, w]. Rule for a model of L blocks:
  the 1-based blocks ceil(k * L / 4), k = 1..4: 3, 6, 9, 12 of 12; 1, 2, 3, 4 of 4; 10, 20, 30, 40 of 40
  (DINOv2's out_index 9, 19, 29, 39); with L < 4 some blocks repeat (L = 1: block 1 four times);
- a backbone without CLS (I-JEPA) uses the mean patch token of the block in its place;
- ``pixels`` (a baseline, the same code path): each patch's normalised pixels flattened (pixel_unshuffle,
  [B, 3p^2, h, w]) concatenated with their mean over the image -> [B, 6p^2, h, w] (lin1 and lin4 alike).

Head: scores = conv1x1(features) [B, n_bins, h, w], bilinearly upsampled x4 (align_corners False). That equals
DINOv2's order (upsample the features, then the 1x1 conv): bilinear weights sum to 1 so the interpolation
commutes with an affine per-pixel map; computing it at patch resolution is cheaper. Bin weights:
``linear`` (AdaBins / DINOv2 default) relu(s) + 0.1 divided by their sum over bins, or ``softmax``; depth =
sum of weights x bin centres, the centres linspace(min_depth, max_depth, n_bins) as DINOv2's "UD" bins
(both ends included); then bilinearly resized to the label size.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fovea.models.vit import VisionTransformer

#: the eps added to relu(scores) by DINOv2's / AdaBins' "linear" normalisation
LINEAR_EPS = 0.1
UPSAMPLE = 4


def lin4_blocks(depth: int) -> list[int]:
    """0-based block indices of lin4 for a model of ``depth`` blocks: ceil(k * depth / 4) - 1, k = 1..4."""
    return [max(1, math.ceil(k * depth / 4)) - 1 for k in range(1, 5)]


def probe_blocks(probe: str, depth: int) -> list[int]:
    """0-based blocks whose tokens the probe reads: lin1 -> [depth - 1]; lin4 -> :func:`lin4_blocks`."""
    if probe == "lin1":
        return [depth - 1]
    if probe == "lin4":
        return lin4_blocks(depth)
    raise ValueError(f"unknown probe {probe!r} (lin1 | lin4)")


def feature_dim(backbone: VisionTransformer, probe: str, features: str = "backbone") -> int:
    """Channels C of :func:`extract_features`."""
    if features == "pixels":
        return 6 * backbone.patch_size ** 2
    return 2 * int(backbone.embed_dim) * len(probe_blocks(probe, int(backbone.depth)))


@torch.no_grad()
def extract_features(backbone: VisionTransformer, x: Tensor, blocks: Sequence[int],
                     features: str = "backbone") -> Tensor:
    """Normalised images x [B, 3, H, W] -> probe features [B, C, h, w] float32 (see the module doc):
    per block in ``blocks`` (0-based, repeats allowed) [patch tokens | CLS broadcast], concatenated."""
    b, _, hh, ww = x.shape
    p = int(backbone.patch_size)
    if hh % p or ww % p:
        raise ValueError(f"input {hh}x{ww} px is not a multiple of the patch size {p}")
    h, w = hh // p, ww // p
    if features == "pixels":
        pix = F.pixel_unshuffle(x.float(), p)
        return torch.cat([pix, pix.mean((2, 3), keepdim=True).expand_as(pix)], 1)
    backbone.eval()
    uniq = sorted(set(blocks))
    has_cls = backbone.cls_token is not None
    outs = backbone.get_intermediate_layers(x, n=uniq, return_class_token=has_cls, norm=True)
    per: dict[int, Tensor] = {}
    for blk, o in zip(uniq, outs):
        if isinstance(o, tuple):
            tok, cls = cast(Tensor, o[0]).float(), cast(Tensor, o[1]).float()
        else:
            tok = cast(Tensor, o).float()
            cls = tok.mean(1)
        grid = tok.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        per[blk] = torch.cat([grid, cls[:, :, None, None].expand_as(grid)], 1)
    return torch.cat([per[blk] for blk in blocks], 1).contiguous()


def bin_weights(scores: Tensor, norm: str = "linear", eps: float = LINEAR_EPS) -> Tensor:
    """Bin scores [B, K, ...] -> weights summing to 1 over dim 1: ``linear`` (relu(s) + eps) / sum,
    ``softmax`` softmax(s)."""
    if norm == "linear":
        s = torch.relu(scores) + eps
        return s / s.sum(1, keepdim=True)
    if norm == "softmax":
        return torch.softmax(scores, 1)
    raise ValueError(f"unknown bin normalisation {norm!r} (linear | softmax)")


class DepthHead(nn.Module):
    """One 1x1 convolution C -> n_bins and the bin-weighted depth. Weight init N(0, 0.01^2) (seeded),
    bias 0: the first prediction is close to the mean bin centre."""

    def __init__(self, in_ch: int, n_bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0,
                 bin_norm: str = "linear", seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, n_bins, kernel_size=1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.01)
            cast(Tensor, self.conv.bias).zero_()
        self.bins: Tensor
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins))
        self.bin_norm = bin_norm
        self.min_depth, self.max_depth = min_depth, max_depth

    def scores(self, feats: Tensor) -> Tensor:
        """[B, C, h, w] -> bin scores [B, n_bins, 4h, 4w] (conv, then bilinear x4)."""
        return F.interpolate(self.conv(feats), scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)

    def forward(self, feats: Tensor, out_size: tuple[int, int]) -> Tensor:
        """[B, C, h, w] -> depth [B, H, W] in metres at ``out_size`` (H, W)."""
        wts = bin_weights(self.scores(feats), self.bin_norm)
        d = torch.einsum("bkhw,k->bhw", wts, self.bins.to(wts.dtype))
        return F.interpolate(d[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]


def make_batches(keys: Sequence[object], batch: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of indices whose ``keys`` (input and label sizes) are equal, in shuffled order."""
    groups: dict[object, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out = []
    for g in groups.values():
        perm = [g[j] for j in rng.permutation(len(g))]
        out += [perm[i:i + batch] for i in range(0, len(perm), batch)]
    return [out[j] for j in rng.permutation(len(out))]


#: get(indices, flips) -> (features [B, C, h, w], depth labels [B, H, W] metres) on the training device, or None
#: (no readable image in the batch: the step is skipped)
BatchFn = Callable[[list[int], list[bool]], "tuple[Tensor, Tensor] | None"]


def train_head(head: DepthHead, get: BatchFn, keys: Sequence[object], epochs: int, lr: float,
               weight_decay: float, batch: int, flip: bool, seed: int, progress: bool = False
               ) -> list[float]:
    """Train ``head`` with AdamW (betas 0.9, 0.999) and a cosine learning-rate decay to 0 over all steps, on
    SigLoss over the valid pixels (gt in (min_depth, max_depth]) of each batch; ``flip`` mirrors each
    sample with probability 1/2 per epoch. Returns the mean loss of each epoch."""
    from tqdm import tqdm

    from fovea.eval.depth.metrics import sig_loss
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n_steps = epochs * len(make_batches(keys, batch, np.random.default_rng(0)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, n_steps) / n_steps)))
    history: list[float] = []
    head.train()
    bar = tqdm(total=n_steps, desc="depth probe", disable=not progress, leave=False)
    for _ in range(epochs):
        tot, n = 0.0, 0
        for idx in make_batches(keys, batch, rng):
            flips = [bool(v) for v in (rng.random(len(idx)) < 0.5)] if flip else [False] * len(idx)
            batch_data = get(idx, flips)
            bar.update(1)
            if batch_data is None:
                continue
            feats, gt = batch_data
            pred = head(feats, (int(gt.shape[-2]), int(gt.shape[-1])))
            valid = (gt > head.min_depth) & (gt <= head.max_depth)
            loss = sig_loss(pred, gt, valid)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            n += len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        history.append(tot / max(n, 1))
    bar.close()
    head.eval()
    return history
