"""Depth metrics and SigLoss against closed forms, hand cases and float64 re-derivations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fovea.eval.depth.metrics import (METRICS, average_metrics, depth_metrics, eigen_mask, image_metrics,
                                      pooled_metrics, sig_loss, valid_mask)


@pytest.mark.parametrize("c, a", [(1.1, (100, 100, 100)), (0.85, (100, 100, 100)), (1.3, (0, 100, 100)),
                                  (0.7, (0, 100, 100)), (1.9, (0, 0, 100)), (2.5, (0, 0, 0))])
def test_constant_ratio_closed_form(c: float, a: tuple[int, int, int]) -> None:
    gt = np.random.default_rng(0).uniform(0.5, 8.0, 1000)
    r = depth_metrics(c * gt, gt)
    assert (r["a1"], r["a2"], r["a3"]) == pytest.approx(a)
    assert r["abs_rel"] == pytest.approx(abs(c - 1))
    assert r["sq_rel"] == pytest.approx((c - 1) ** 2 * gt.mean())
    assert r["rmse"] == pytest.approx(abs(c - 1) * math.sqrt(np.mean(gt ** 2)))
    assert r["rmse_log"] == pytest.approx(abs(math.log(c)))
    assert r["log_10"] == pytest.approx(abs(math.log10(c)))
    assert r["mae"] == pytest.approx(abs(c - 1) * gt.mean())
    assert r["silog"] == pytest.approx(0.0, abs=1e-4)
    assert set(r) == set(METRICS)


def test_silog_formula() -> None:
    """silog = 100 sqrt(mean(d^2) - mean(d)^2), d = log(pred) - log(gt): a hand case with d = +-log 2."""
    gt = np.array([1.0, 1.0, 2.0, 2.0])
    pred = np.array([2.0, 0.5, 4.0, 1.0])  # d = log2, -log2, log2, -log2: mean 0, mean square log(2)^2
    r = depth_metrics(pred, gt)
    assert r["silog"] == pytest.approx(100 * math.log(2))
    assert r["a1"] == 0 and r["a2"] == 0 and r["a3"] == 0
    assert r["abs_rel"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)


def test_invalid_pixels_and_eigen_crop() -> None:
    """480x640: outside the crop huge errors; inside, gt = 2 m, pred = 2 m but 100 pixels at 4 m, 50 pixels
    without depth (0), 30 beyond max (12 m), 10 exactly at max (10 m, valid, predicted right)."""
    gt = np.full((480, 640), 5.0)
    pred = np.full((480, 640), 1.0)
    gt[45:471, 41:601] = 2.0
    pred[45:471, 41:601] = 2.0
    pred[100:110, 100:110] = 4.0
    gt[200, 100:150] = 0.0
    pred[200, 100:150] = 9.0
    gt[300, 100:130] = 12.0
    gt[400, 100:110] = 10.0
    pred[400, 100:110] = 10.0
    n = 426 * 560 - 50 - 30
    r = image_metrics(pred, gt, 1e-3, 10.0, crop=True)
    assert r is not None
    assert valid_mask(gt, 1e-3, 10.0, crop=True).sum() == n
    assert r["abs_rel"] == pytest.approx(100 / n)
    assert r["a1"] == pytest.approx((n - 100) / n * 100)
    assert r["mae"] == pytest.approx(200 / n)
    assert r["rmse"] == pytest.approx(math.sqrt(400 / n))
    assert r["log_10"] == pytest.approx(100 * math.log10(2) / n)
    uncropped = image_metrics(pred, gt, 1e-3, 10.0, crop=False)
    assert uncropped is not None and uncropped["abs_rel"] > 0.1  # the 5 m vs 1 m border counts there
    assert image_metrics(np.ones((4, 4)), np.zeros((4, 4)), 1e-3, 10.0) is None


def test_eigen_mask_sizes() -> None:
    m = eigen_mask((480, 640))
    assert m.sum() == 426 * 560 and m[45, 41] and not m[44, 41] and not m[45, 40] and m[470, 600]
    assert not m[471, 600] and not m[470, 601]
    s = eigen_mask((240, 320))
    rows, cols = np.where(s.any(1))[0], np.where(s.any(0))[0]
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (23, 236, 21, 301)


def test_predictions_clipped_to_range() -> None:
    gt = np.array([[1.0, 2.0]])
    r = image_metrics(np.array([[0.0, 50.0]]), gt, 0.5, 10.0)  # clipped to 0.5 and 10
    assert r is not None and r["mae"] == pytest.approx((0.5 + 8.0) / 2)


def test_per_image_average_differs_from_pooled() -> None:
    """Image 1: 4 valid pixels predicted exactly; image 2: 1 valid pixel predicted at twice its depth."""
    g1, p1 = np.ones((2, 2)), np.ones((2, 2))
    g2 = np.array([[3.0, 0.0], [0.0, 0.0]])
    p2 = np.array([[6.0, 1.0], [1.0, 1.0]])
    per = [image_metrics(p, g, 1e-3, 10.0) for p, g in ((p1, g1), (p2, g2))]
    avg = average_metrics([r for r in per if r is not None])
    pooled = pooled_metrics([p1, p2], [g1, g2], 1e-3, 10.0)
    assert avg["abs_rel"] == pytest.approx(0.5) and pooled["abs_rel"] == pytest.approx(0.2)
    assert avg["rmse"] == pytest.approx(1.5) and pooled["rmse"] == pytest.approx(math.sqrt(9 / 5))
    assert avg["a1"] == pytest.approx(50.0) and pooled["a1"] == pytest.approx(80.0)
    assert math.isnan(average_metrics([])["a1"])


def test_sig_loss_matches_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 5, 6, generator=gen) * 5 + 0.1
    gt = torch.rand(2, 5, 6, generator=gen) * 5 + 0.1
    valid = torch.rand(2, 5, 6, generator=gen) > 0.3
    pred.requires_grad_(True)
    loss = sig_loss(pred, gt, valid)
    p = pred.detach().double().numpy()[valid.numpy()]
    g = gt.double().numpy()[valid.numpy()]
    d = np.log(p / g)
    ref = math.sqrt(np.sum((d - d.sum() / d.size) ** 2) / d.size + 0.15 * (d.sum() / d.size) ** 2)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert bool((pred.grad[~valid] == 0).all()) and bool((pred.grad[valid] != 0).any())
    # scale: a constant ratio c gives sqrt(0.15) |log c|
    assert float(sig_loss(gt * 2, gt, valid)) == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-5)
    zero = sig_loss(pred, gt, torch.zeros_like(valid))
    assert float(zero.detach()) == 0.0 and zero.requires_grad
