"""Pictures users expect: PCA of patch features mapped to RGB, and last-block CLS attention maps.

PCA (DINOv2's recipe): the first principal component of all patches of the grid separates
foreground from background (the side with less weight on image borders is foreground); a
3-component PCA of the foreground patches is then mapped to RGB (background black). Attention:
the CLS row of the last block's softmax attention over patches, averaged over heads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize
from fovea.data.sources import ImageSource
from fovea.models.vit import VisionTransformer


def pca(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k principal directions of rows x [N, D] -> (projections [N, k], components [k, D])."""
    mu = x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x - mu, full_matrices=False)
    comps = v[:k]
    return (x - mu) @ comps.T, comps


def _unit_range(x: Tensor) -> Tensor:
    """Per-column robust min-max (2nd-98th percentile) to [0, 1] of x [N, k]."""
    lo = torch.quantile(x, 0.02, dim=0, keepdim=True)
    hi = torch.quantile(x, 0.98, dim=0, keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def pca_rgb(patches: Tensor, foreground: bool = True) -> Tensor:
    """Patch features [B, h, w, D] -> RGB in [0, 1] [B, h, w, 3] from a PCA shared by the batch."""
    b, h, w, d = patches.shape
    x = patches.reshape(-1, d).float()
    fg = torch.ones(x.shape[0], dtype=torch.bool)
    if foreground and x.shape[0] > 8:
        p1 = pca(x, 1)[0][:, 0].reshape(b, h, w)
        border = torch.zeros(h, w, dtype=torch.bool)
        border[0], border[-1], border[:, 0], border[:, -1] = True, True, True, True
        side = p1 > 0
        # background touches the borders more: foreground is the side with the smaller border share
        if side[:, border].float().mean() > side[:, ~border].float().mean():
            side = ~side
        if 0.05 < side.float().mean() < 0.95:
            fg = side.reshape(-1)
    proj = pca(x[fg], 3)[0] if fg.sum() > 3 else torch.zeros(int(fg.sum()), 3)
    rgb = torch.zeros(x.shape[0], 3)
    rgb[fg] = _unit_range(proj) if len(proj) else proj
    return rgb.reshape(b, h, w, 3)


@torch.no_grad()
def cls_attention(backbone: VisionTransformer, x: Tensor) -> Tensor:
    """Normalised images [B, 3, H, W] -> last-block CLS attention to patches [B, heads, h, w].

    A backbone without CLS token (I-JEPA) gives the attention each patch receives, averaged over
    all patch queries.
    """
    t = backbone.prepare_tokens(x)
    rope = backbone.rope_for(x)
    *first, last = backbone.block_list
    for blk in first:
        t = blk(t, rope=rope)
    att = last.attn.attention_map(last.norm1(t), rope)  # [B, heads, N, N]
    np_, p = backbone.n_prefix, backbone.patch_size
    a = att[:, :, 0, np_:] if backbone.n_cls else att[:, :, np_:, np_:].mean(2)
    return a.reshape(x.shape[0], -1, x.shape[2] // p, x.shape[3] // p)


def _upsample(maps: Tensor, size: int, mode: str = "nearest") -> Tensor:
    """[B, C, h, w] -> [B, C, size, size]."""
    return F.interpolate(maps, size=(size, size), mode=mode)


def _heat(a: Tensor) -> Tensor:
    """Attention map [h, w] -> RGB [h, w, 3] in [0, 1] (black -> red -> yellow -> white)."""
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    return torch.stack([(3 * a).clamp(0, 1), (3 * a - 1).clamp(0, 1), (3 * a - 2).clamp(0, 1)], -1)


def save_grid(rows: list[list[Tensor]], path: str | Path, pad: int = 2) -> Path:
    """Write tiles (RGB [S, S, 3] in [0, 1], all the same size) laid out as ``rows`` to a PNG."""
    s = rows[0][0].shape[0]
    nr, nc = len(rows), max(len(r) for r in rows)
    canvas = np.full((nr * (s + pad) + pad, nc * (s + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (s + pad), pad + j * (s + pad)
            canvas[y:y + s, x:x + s] = (tile.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


@torch.no_grad()
def make_pictures(backbone: VisionTransformer, source: ImageSource, out_dir: str | Path, size: int,
                  n_images: int = 8, display: int = 128, device: torch.device | None = None,
                  mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                  seed: int = 0, prefix: str = "") -> dict[str, str]:
    """PNG grids for ``n_images`` random images of ``source`` at ``size`` px input, tiles of ``display`` px.

    ``{prefix}pca.png``: one row per image: image | PCA colours | PCA colours without foreground
    masking. ``{prefix}attention.png``: image | mean-over-heads CLS attention | each head.
    Returns {"pca": path, "attention": path}.
    """
    device = device or torch.device("cpu")
    backbone.eval()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(source), size=min(n_images, len(source)), replace=False))
    imgs = []
    for i in idx:
        img = source.load(int(i))
        imgs.append(eval_transform(img if img is not None else np.zeros((size, size, 3), np.uint8), size))
    raw = torch.stack(imgs)  # uint8 [B, 3, S, S]
    x = normalize(raw.to(device), list(mean), list(std))
    p = backbone.patch_size
    patches = backbone.forward_features(x).patches.float().cpu()
    patches = patches.reshape(len(idx), size // p, size // p, -1)
    shown = _upsample(raw.float() / 255, display, "bilinear").permute(0, 2, 3, 1)
    pc_fg = _upsample(pca_rgb(patches, True).permute(0, 3, 1, 2), display).permute(0, 2, 3, 1)
    pc_all = _upsample(pca_rgb(patches, False).permute(0, 3, 1, 2), display).permute(0, 2, 3, 1)
    att = cls_attention(backbone, x).float().cpu()
    att_up = _upsample(att, display)
    out = Path(out_dir)
    rows_pca = [[shown[b], pc_fg[b], pc_all[b]] for b in range(len(idx))]
    rows_att = [[shown[b], _heat(att_up[b].mean(0))] + [_heat(att_up[b, h]) for h in range(att.shape[1])]
                for b in range(len(idx))]
    return {"pca": str(save_grid(rows_pca, out / f"{prefix}pca.png")),
            "attention": str(save_grid(rows_att, out / f"{prefix}attention.png"))}
