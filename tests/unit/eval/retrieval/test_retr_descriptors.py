"""GeM by hand, the resize and crop rules, multi-scale descriptors normalised per image (independent of the
batch size, unlike a whole-batch normalisation), the pixel baseline and PCA whitening."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from retr_helpers import pattern, save_jpg, tiny_ctx

from fovea.eval.retrieval.descriptors import (MULTISCALE, DescriptorSpec, ImageList, backbone_descriptor, crop_box,
                                              describe, gem, pca_whitening, pixel_descriptor, resize_longer,
                                              resize_square)


def test_gem_by_hand() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # [B=1, N=2 tokens, D=2]
    # dim 0: ((1^3 + 3^3) / 2)^(1/3) = 14^(1/3) = 2.41014; dim 1: ((2^3 + (1e-6)^3) / 2)^(1/3) = 4^(1/3) = 1.58740
    assert gem(x, 3.0)[0].tolist() == pytest.approx([14 ** (1 / 3), 4 ** (1 / 3)], rel=1e-6)
    # p = 4: ((1 + 81) / 2)^(1/4) = 41^(1/4) = 2.53044
    assert float(gem(x, 4.0)[0, 0]) == pytest.approx(41 ** 0.25, rel=1e-6)
    # p = 1 is the mean of the clamped tokens
    assert gem(x, 1.0)[0].tolist() == pytest.approx([2.0, 1.0], rel=1e-5)


def test_resize_and_crop_rules() -> None:
    img = np.zeros((300, 500, 3), np.uint8)
    assert resize_longer(img, 224, 16).shape == (128, 224, 3)  # 300 * 224/500 = 134.4 -> 8 patches = 128
    assert resize_longer(img, 224, 14).shape == (140, 224, 3)  # 134.4 / 14 = 9.6 -> 10 patches
    assert resize_longer(np.zeros((10, 400, 3), np.uint8), 64, 16).shape == (16, 64, 3)  # at least one patch
    assert resize_square(img, 320, 16).shape == (320, 320, 3)
    assert resize_square(img, 100, 16).shape == (96, 96, 3)
    big = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    # PIL's crop rounds the box: (2.4, 3.6, 10.5, 15.2) -> (2, 4, 10, 15); clipped to the image
    assert crop_box(big, [2.4, 3.6, 10.5, 15.2]).shape == (11, 8, 3)  # type: ignore[union-attr]
    assert np.array_equal(crop_box(big, [2, 4, 10, 15]), big[4:15, 2:10])  # type: ignore[arg-type]
    assert crop_box(big, [-5, -5, 100, 100]).shape == (20, 30, 3)  # type: ignore[union-attr]
    assert crop_box(big, [5, 5, 6, 50]) is None


def test_pixel_descriptor() -> None:
    img = pattern(3, 40, 40)
    d = pixel_descriptor(img, 8)
    assert d.shape == (8 * 8 * 3,) and abs(float(d.mean())) < 1e-6
    assert torch.allclose(d, pixel_descriptor(np.ascontiguousarray(img[:, :, :]), 8))


def _images(tmp_path: Path, n: int = 5) -> list[Path]:
    return [save_jpg(tmp_path / f"i{k}.jpg", pattern(k, 40 + 8 * (k % 2), 56)) for k in range(n)]


def test_multiscale_is_normalised_per_image_whatever_the_batch(tmp_path: Path) -> None:
    paths = _images(tmp_path)
    spec = DescriptorSpec(kind="gem", gem_p=3.0, scales=MULTISCALE)
    out = {}
    for bs in (1, 2, 5):
        ctx = tiny_ctx(tmp_path, batch_size=bs)
        d, bad = describe(ctx, ImageList(paths, size=48, multiple=8), spec)
        assert bad == []
        out[bs] = F.normalize(d, dim=1)
    for bs in (2, 5):
        assert torch.allclose(out[1], out[bs], atol=1e-5)
    assert torch.allclose(out[1].norm(dim=1), torch.ones(5))
    # DINO v1's whole-batch normalisation differs: the rows would not have norm 1
    raw, _ = describe(tiny_ctx(tmp_path, 5), ImageList(paths, size=48, multiple=8), spec)
    assert not torch.allclose((raw / raw.norm()).norm(dim=1), torch.ones(5), atol=1e-2)
    # the same descriptor by hand: mean over scales 1, 1/sqrt2, 1/2 of the image resized to rounded sizes
    ctx = tiny_ctx(tmp_path, 1)
    _, img = ImageList(paths, size=48, multiple=8)[0]  # 40 x 56 -> 34.3 x 48 -> 32 x 48 (patch 8)
    assert img is not None and img.shape == (32, 48, 3)
    x = ctx.to_input(img)
    # 1/sqrt2: 22.6 x 33.9 -> 24 x 32; 1/2: 16 x 24
    sizes = [(32, 48), (24, 32), (16, 24)]
    hand = sum(backbone_descriptor(ctx, F.interpolate(x, size=s, mode="bilinear", align_corners=False)
                                   if s != (32, 48) else x, "gem", 3.0) for s in sizes) / 3
    assert torch.allclose(F.normalize(hand, dim=1)[0], out[1][0], atol=1e-5)


def test_unreadable_images_are_returned(tmp_path: Path) -> None:
    paths = _images(tmp_path, 3)
    paths[1].write_bytes(b"broken")
    d, bad = describe(tiny_ctx(tmp_path), ImageList(paths, size=32, multiple=8), DescriptorSpec())
    assert bad == [1] and d.shape == (3, 48) and float(d[1].abs().sum()) == 0 and float(d[0].abs().sum()) > 0
    d, bad = describe(tiny_ctx(tmp_path), ImageList(paths, mode="none"), DescriptorSpec(features="pixels", pixel_size=4))
    assert bad == [1] and d.shape == (3, 48)


def test_pca_whitening_gives_identity_covariance() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    mu, proj = pca_whitening(x)
    y = (x - mu) @ proj
    cov = (y.T @ y) / (len(y) - 1)
    assert torch.allclose(cov, torch.eye(6), atol=1e-3) and torch.allclose(y.mean(0), torch.zeros(6), atol=1e-4)
    _, proj2 = pca_whitening(x, dim=2)
    assert proj2.shape == (6, 2)
