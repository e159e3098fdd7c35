"""The linear depth probe: block choice, feature shapes and contents, bin normalisation, the head."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fovea.eval.depth.probe import (DepthHead, bin_weights, extract_features, feature_dim, lin4_blocks, make_batches,
                                    probe_blocks)
from fovea.models.vit import ViTConfig, build_vit


def _vit(depth: int, cls: bool = True):
    torch.manual_seed(0)
    return build_vit(ViTConfig(arch="vit_tiny", depth=depth, embed_dim=48, num_heads=3, patch_size=8, img_size=32,
                               cls_token=cls)).eval()


def test_block_choice() -> None:
    assert [b + 1 for b in lin4_blocks(12)] == [3, 6, 9, 12]
    assert [b + 1 for b in lin4_blocks(4)] == [1, 2, 3, 4]
    assert lin4_blocks(40) == [9, 19, 29, 39]  # DINOv2 ViT-g out_index
    assert [b + 1 for b in lin4_blocks(6)] == [2, 3, 5, 6]
    assert lin4_blocks(1) == [0, 0, 0, 0]
    assert probe_blocks("lin1", 12) == [11]
    with pytest.raises(ValueError):
        probe_blocks("lin2", 12)


def test_feature_shapes_and_contents() -> None:
    vit = _vit(4)
    x = torch.randn(2, 3, 16, 24)
    f1 = extract_features(vit, x, probe_blocks("lin1", 4))
    f4 = extract_features(vit, x, probe_blocks("lin4", 4))
    assert f1.shape == (2, 96, 2, 3) and f4.shape == (2, 384, 2, 3)
    assert feature_dim(vit, "lin1") == 96 and feature_dim(vit, "lin4") == 384
    with torch.no_grad():
        # re-derivation: run the blocks by hand, final norm on each chosen block's tokens
        t = vit.prepare_tokens(x)
        normed = []
        for blk in vit.blocks:
            t = blk(t)
            normed.append(vit.norm(t))
        ff = vit.forward_features(x)
    last = ff.patches.reshape(2, 2, 3, 48).permute(0, 3, 1, 2)
    assert torch.allclose(f1[:, :48], last, atol=1e-5)
    assert torch.allclose(f1[:, 48:], ff.cls[:, :, None, None].expand(2, 48, 2, 3), atol=1e-5)
    for k in range(4):
        tok = normed[k]
        chunk = f4[:, 96 * k:96 * (k + 1)]
        assert torch.allclose(chunk[:, :48], tok[:, 1:].reshape(2, 2, 3, 48).permute(0, 3, 1, 2), atol=1e-5)
        assert torch.allclose(chunk[:, 48:, 1, 2], tok[:, 0], atol=1e-5)
    assert not torch.allclose(f4[:, :48], f4[:, 96:144])  # different blocks
    rep = extract_features(_vit(1), x, probe_blocks("lin4", 1))  # 1 block: repeated 4 times
    assert rep.shape == (2, 384, 2, 3) and torch.equal(rep[:, :96], rep[:, 288:])


def test_features_without_cls_and_pixels() -> None:
    vit = _vit(2, cls=False)
    x = torch.randn(1, 3, 16, 16)
    f = extract_features(vit, x, [1])
    assert torch.allclose(f[:, 48:, 0, 0], f[:, :48].mean((2, 3)), atol=1e-5)  # mean patch token for CLS
    px = extract_features(vit, x, [1], "pixels")
    assert px.shape == (1, 6 * 64, 2, 2) and feature_dim(vit, "lin4", "pixels") == 384
    assert torch.equal(px[0, :3 * 64, 1, 0], torch.stack([x[0, c, 8:16, 0:8].reshape(-1) for c in range(3)]).reshape(-1))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        extract_features(vit, torch.randn(1, 3, 12, 16), [1])


def test_bin_weights_hand_case() -> None:
    s = torch.tensor([-1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    lin = bin_weights(s, "linear").flatten()
    assert torch.allclose(lin, torch.tensor([0.1, 2.1, 0.6]) / 2.8)
    e = [math.exp(-1), math.exp(2), math.exp(0.5)]
    assert torch.allclose(bin_weights(s, "softmax").flatten(), torch.tensor(e) / sum(e))
    with pytest.raises(ValueError):
        bin_weights(s, "sigmoid")


@pytest.mark.parametrize("norm, expect", [("linear", (0.1 * 1 + 2.1 * 2 + 0.6 * 3) / 2.8),
                                          ("softmax", (math.exp(-1) + 2 * math.exp(2) + 3 * math.exp(0.5))
                                           / (math.exp(-1) + math.exp(2) + math.exp(0.5)))])
def test_head_depth_hand_case(norm: str, expect: float) -> None:
    head = DepthHead(1, n_bins=3, min_depth=1.0, max_depth=3.0, bin_norm=norm)
    assert torch.equal(head.bins, torch.tensor([1.0, 2.0, 3.0]))
    with torch.no_grad():
        head.conv.weight.copy_(torch.tensor([-1.0, 2.0, 0.5]).reshape(3, 1, 1, 1))
        head.conv.bias.zero_()
        d = head(torch.ones(2, 1, 1, 2), (5, 7))
    assert d.shape == (2, 5, 7)
    assert torch.allclose(d, torch.full((2, 5, 7), expect), atol=1e-6)


def test_head_scores_equal_dinov2_order() -> None:
    """conv(upsample x4 of features) == upsample x4 of conv(features): the head computes the latter."""
    head = DepthHead(5, n_bins=16, seed=3)
    f = torch.randn(2, 5, 3, 4)
    with torch.no_grad():
        ref = head.conv(F.interpolate(f, scale_factor=4, mode="bilinear", align_corners=False))
        assert torch.allclose(head.scores(f), ref, atol=1e-5)
        assert head.scores(f).shape == (2, 16, 12, 16)
        d = head(f, (30, 40))
    assert d.shape == (2, 30, 40) and float(d.min()) >= 1e-3 and float(d.max()) <= 10.0


def test_make_batches_groups_keys() -> None:
    keys = ["a", "b", "a", "a", "b", "a", "a"]
    batches = make_batches(keys, 2, np.random.default_rng(0))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({keys[i] for i in b}) == 1 and len(b) <= 2 for b in batches)
