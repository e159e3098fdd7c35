"""Label propagation on hand-made features (top-k, radius, context), against a dense re-derivation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fovea.eval.video.propagate as prop
from fovea.eval.video.propagate import (first_labels, frame_size, norm_channels, propagate_frame, propagate_sequence,
                                        to_mask)


def test_frame_size_rule():
    assert frame_size(480, 854) == (480, 832)  # DAVIS 480p: 854 floored to a multiple of 64
    assert frame_size(854, 480) == (832, 480)  # portrait: the width is the short side
    assert frame_size(240, 432, 240) == (240, 384)
    assert frame_size(240, 432, 240, 16) == (240, 432)
    assert frame_size(240, 432, 480) == (480, 832)  # 864 -> 832
    assert frame_size(100, 100, 64, 32) == (64, 64)


def _cos_features(cos: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target [1, w, D] all e_0 and context [1, 1, w, D] with cos(target, context patch j) = cos[j]."""
    w = len(cos)
    ctx = torch.zeros(1, 1, w, w + 1, dtype=torch.float64)
    for j, c in enumerate(cos):
        ctx[0, 0, j, 0] = c
        ctx[0, 0, j, 1 + j] = math.sqrt(1 - c * c)
    tar = torch.zeros(1, w, w + 1, dtype=torch.float64)
    tar[..., 0] = 1
    return tar.float(), ctx.float()


COS = [0.9, 0.85, 0.3, 0.8, 0.1]
LAB = F.one_hot(torch.tensor([j % 2 for j in range(5)]), 2).float().reshape(1, 1, 5, 2)  # classes 0 1 0 1 0


def test_topk_weights_by_hand():
    tar, ctx = _cos_features(COS)
    out = propagate_frame(tar, ctx, LAB, topk=3, radius=0, temperature=0.1)
    # top-3 of 0.9 (class 0), 0.85 (1), 0.8 (1): weights e^9, e^8.5, e^8
    p0 = 1 / (1 + math.exp(-0.5) + math.exp(-1.0))
    assert out[0, 0].tolist() == pytest.approx([p0, 1 - p0], abs=1e-6)
    assert torch.allclose(out[0], out[0, :1].expand(5, 2))  # no window: every target patch the same
    out1 = propagate_frame(tar, ctx, LAB, topk=1, radius=0)
    assert out1[0, 0].tolist() == [1.0, 0.0]


def test_radius_restricts_the_window():
    tar, ctx = _cos_features(COS)
    out = propagate_frame(tar, ctx, LAB, topk=3, radius=1, temperature=0.1)
    # patch 0 sees context 0, 1 only (both kept: fewer than k in the window)
    p0 = 1 / (1 + math.exp(-0.5))
    assert out[0, 0].tolist() == pytest.approx([p0, 1 - p0], abs=1e-6)
    # patch 2 sees 1, 2, 3: 0.85 (1), 0.3 (0), 0.8 (1)
    e = [math.exp(c / 0.1) for c in (0.85, 0.3, 0.8)]
    assert out[0, 2, 0].item() == pytest.approx(e[1] / sum(e), rel=1e-5)
    # patch 4 sees 3, 4 -> 0.8 (class 1), 0.1 (class 0)
    e4 = [math.exp(8.0), math.exp(1.0)]
    assert out[0, 4, 1].item() == pytest.approx(e4[0] / sum(e4), rel=1e-5)


def test_topk_is_joint_over_context_frames():
    tar, ctx = _cos_features([0.9, 0.2])
    _, ctx2 = _cos_features([0.1, 0.95])
    lab = torch.stack([F.one_hot(torch.tensor([0, 0]), 2).float().reshape(1, 2, 2),
                       F.one_hot(torch.tensor([1, 1]), 2).float().reshape(1, 2, 2)])
    out = propagate_frame(tar, torch.cat([ctx, ctx2]), lab, topk=1, radius=0)
    assert out[0, 0].tolist() == [0.0, 1.0]  # the best patch (0.95) is in the second context frame
    out2 = propagate_frame(tar, torch.cat([ctx, ctx2]), lab, topk=2, radius=0)
    e = math.exp(0.5)  # e^9.5 vs e^9
    assert out2[0, 0, 1].item() == pytest.approx(e / (1 + e), rel=1e-5)


def test_ties_at_the_kth_value_are_kept():
    # one-hot features: self cos 1, all others cos 0 (tied): top-2 keeps self and every tie
    h, w = 2, 3
    feats = torch.eye(h * w).reshape(h, w, h * w)
    lab = F.one_hot(torch.arange(h * w) % 2, 2).float().reshape(1, h, w, 2)
    out = propagate_frame(feats, feats[None], lab, topk=2, radius=0, temperature=0.1)
    s = math.exp(10)
    # patch 0 (class 0): self + 5 tied others (2 class 0, 3 class 1)
    assert out[0, 0, 0].item() == pytest.approx((s + 2) / (s + 5), rel=1e-6)
    out1 = propagate_frame(feats, feats[None], lab, topk=1, radius=0)
    assert torch.equal(out1, lab[0])  # top-1 = itself: labels copied


def _dense(tar, feats, labels, topk, radius, t):
    """DINO's construction in float64: the full [n, hw, hw] affinity, the window as a 0/1 product."""
    h, w, d = tar.shape
    n = feats.shape[0]
    q = tar.reshape(-1, d).double()
    aff = torch.exp(torch.stack([q @ f.reshape(-1, d).double().T for f in feats]) / t)  # [n, hw_t, hw_s]
    if radius > 0:
        ii = torch.arange(h).repeat_interleave(w)
        jj = torch.arange(w).repeat(h)
        win = ((ii[:, None] - ii[None]).abs() <= radius) & ((jj[:, None] - jj[None]).abs() <= radius)
        aff = aff * win
    aff = aff.permute(1, 0, 2).reshape(h * w, -1)
    kth = aff.sort(dim=1, descending=True).values[:, topk - 1:topk]
    aff = torch.where(aff >= kth, aff, 0.0)
    aff = aff / aff.sum(1, keepdim=True)
    return (aff @ labels.reshape(-1, labels.shape[-1]).double()).reshape(h, w, -1)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_banded_propagation_matches_dense(radius):
    g = torch.Generator().manual_seed(0)
    h, w, d, n, c = 6, 7, 16, 3, 3
    tar = F.normalize(torch.randn(h, w, d, generator=g), dim=-1)
    feats = F.normalize(torch.randn(n, h, w, d, generator=g), dim=-1)
    labels = torch.softmax(torch.randn(n, h, w, c, generator=g), -1)
    ref = _dense(tar, feats, labels, 5, radius, 0.1)
    for max_elems in (1 << 24, 1):  # one chunk, one row per chunk
        out = propagate_frame(tar, feats, labels, topk=5, radius=radius, temperature=0.1, max_elems=max_elems)
        assert torch.allclose(out.double(), ref, atol=1e-5)


def test_sequence_context_is_first_plus_last_n(monkeypatch):
    seen: list[list[float]] = []

    def fake(target, ctx_feats, ctx_labels, *a, **k):
        seen.append([float(f[0, 0, 0]) for f in ctx_feats])  # frame ids
        return torch.full_like(ctx_labels[0], float(target[0, 0, 0]))

    monkeypatch.setattr(prop, "propagate_frame", fake)
    feats = [torch.full((1, 1, 2), float(t)) for t in range(6)]
    outs = list(propagate_sequence(feats, torch.zeros(1, 1, 2), n_last=2))
    assert len(outs) == 5
    assert seen == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4]]
    seen.clear()
    list(propagate_sequence(feats, torch.zeros(1, 1, 2), n_last=0))
    assert seen == [[0]] * 5


def test_to_mask_upsamples_normalises_and_argmaxes():
    soft = torch.tensor([[[0.9, 0.1], [0.8, 0.2]]])  # [h=1, w=2, C=2]
    # bilinear x2: ch1 = [.1, .125, .175, .2] -> min-max [0, .25, .75, 1]; ch0 mirrored -> argmax 0 0 1 1
    assert to_mask(soft, 2, 2, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert to_mask(soft, 2, 4, 8).tolist()[0] == [0, 0, 0, 0, 1, 1, 1, 1]  # nearest to the frame size
    x = torch.zeros(2, 1, 3)
    x[0] = 0.5
    assert norm_channels(x).tolist() == [[[1.0, 1.0, 1.0]], [[0.0, 0.0, 0.0]]]


def test_first_labels_use_pils_nearest_rule():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 4, (37, 61), dtype=np.uint8)
    lab = first_labels(m, (40, 64), 8, 4)
    ref = np.array(Image.fromarray(m).resize((8, 5), Image.NEAREST))
    assert lab.shape == (5, 8, 4) and (lab.argmax(-1).numpy() == ref).all()
    assert torch.equal(lab.sum(-1), torch.ones(5, 8))
