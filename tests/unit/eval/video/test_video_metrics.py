"""The davis2017 metrics against hand-computed cases and a float64 brute-force re-derivation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fovea.eval.video.metrics import (boundary_f, boundary_map, boundary_tolerance, decay_bins, disk,
                                      evaluate_sequence, object_figures, region_similarity, statistics, summarise)


def _square(h: int, w: int, y0: int, x0: int, n: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y0 + n, x0:x0 + n] = True
    return m


def test_region_similarity_known_overlap():
    gt = _square(10, 10, 2, 2, 4)  # 16 px
    pred = _square(10, 10, 2, 4, 4)  # shifted 2 columns: 8 shared, union 24
    assert region_similarity(gt, pred)[0] == pytest.approx(8 / 24)
    assert region_similarity(gt, gt)[0] == 1.0
    empty = np.zeros((10, 10), bool)
    assert region_similarity(empty, empty)[0] == 1.0  # empty gt and empty prediction
    assert region_similarity(gt, empty)[0] == 0.0
    void = np.zeros((10, 10), bool)
    void[:, 6:] = True  # hides pred's 8 px of columns 6, 7: 8 shared of union 16
    assert region_similarity(gt, pred, void)[0] == pytest.approx(8 / 16)
    stack = region_similarity(np.stack([gt, gt]), np.stack([pred, gt]))
    assert stack.shape == (2,) and stack.tolist() == pytest.approx([1 / 3, 1.0])


def test_boundary_map_by_hand():
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    expect = np.array([[1, 1, 1, 1, 0],
                       [1, 0, 0, 1, 0],
                       [1, 0, 0, 1, 0],
                       [1, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0]], bool)
    assert (boundary_map(m) == expect).all()


def test_disk_and_tolerance():
    assert disk(1).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(2).sum() == 13  # offsets with dx^2 + dy^2 <= 4
    assert boundary_tolerance(480, 854) == 8.0  # ceil(0.008 * 979.6)
    assert boundary_tolerance(100, 100) == 2.0  # ceil(1.13)
    assert boundary_tolerance(240, 432) == 4.0  # ceil(3.95)
    assert boundary_tolerance(10, 10, 3) == 3.0  # >= 1: pixels


def _brute_f(gt: np.ndarray, pred: np.ndarray, radius: float) -> float:
    """F by explicit Euclidean distances between boundary pixel lists (float64)."""
    bg, bp = np.argwhere(boundary_map(gt)).astype(np.float64), np.argwhere(boundary_map(pred)).astype(np.float64)
    if len(bg) == 0 or len(bp) == 0:
        return 1.0 if len(bg) == len(bp) else 0.0
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    p = float((d.min(1) <= radius).mean())
    r = float((d.min(0) <= radius).mean())
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("k,expect", [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.0), (5, 0.0)])
def test_boundary_f_shifted_edge_against_tolerance(k, expect):
    # gt = columns < 50 of a 100x100 image: boundary = column 49; pred shifted by k; tolerance 2 px
    gt = np.zeros((100, 100), bool)
    gt[:, :50] = True
    pred = np.zeros_like(gt)
    pred[:, :50 + k] = True
    assert boundary_f(gt, pred)[0] == expect
    assert _brute_f(gt, pred, 2.0) == expect


def test_boundary_f_tolerance_at_davis_size():
    gt = np.zeros((480, 854), bool)
    gt[:, :400] = True
    for k, expect in ((8, 1.0), (9, 0.0)):
        pred = np.zeros_like(gt)
        pred[:, :400 + k] = True
        assert boundary_f(gt, pred)[0] == expect


def test_boundary_f_step_by_hand():
    # pred: columns < 50 on rows < 30, columns < 55 below. Pred boundary: col 49 rows 0-29 (30), row 29
    # cols 50-54 (5, above the step), col 54 rows 30-99 (70) = 105 px; 32 within 2 px of col 49.
    # gt boundary: col 49 (100 px); rows 0-31 within 2 px of the prediction's. F = 2*32 / (105 + 100).
    gt = np.zeros((100, 100), bool)
    gt[:, :50] = True
    pred = np.zeros_like(gt)
    pred[:30, :50] = True
    pred[30:, :55] = True
    assert boundary_map(pred).sum() == 105
    assert boundary_f(gt, pred)[0] == pytest.approx(64 / 205)
    assert _brute_f(gt, pred, 2.0) == pytest.approx(64 / 205)


def test_boundary_f_random_blobs_match_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(5):
        yy, xx = np.mgrid[0:60, 0:80]
        cy, cx, r = rng.uniform(15, 45), rng.uniform(20, 60), rng.uniform(5, 15)
        gt = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        pred = (yy - cy - rng.uniform(-4, 4)) ** 2 / rng.uniform(0.7, 1.3) + (xx - cx - rng.uniform(-4, 4)) ** 2 <= r ** 2
        assert boundary_f(gt, pred)[0] == pytest.approx(_brute_f(gt, pred, boundary_tolerance(60, 80)), abs=1e-12)


def test_boundary_f_empty_cases():
    e = np.zeros((20, 20), bool)
    s = _square(20, 20, 5, 5, 6)
    assert boundary_f(e, e)[0] == 1.0
    assert boundary_f(s, e)[0] == 0.0
    assert boundary_f(e, s)[0] == 0.0


def test_statistics_hand_list():
    x = np.array([1.0, 0.9, 0.8, 0.4, 0.6, 0.3, 0.2, 0.7, 0.1, 0.5])
    assert decay_bins(10) == [(0, 3), (2, 6), (5, 8), (7, 10)]  # edges round(1, 3.25, 5.5, 7.75, 10) - 1
    mean, recall, decay = statistics(x)
    assert mean == pytest.approx(0.55)
    assert recall == pytest.approx(0.5)  # 1, .9, .8, .6, .7 (0.5 itself is not > 0.5)
    assert decay == pytest.approx(0.9 - (0.7 + 0.1 + 0.5) / 3)
    assert statistics(np.array([0.2, np.nan, 0.8, 0.5]))[0] == pytest.approx(0.5)  # NaN left out


def test_evaluate_sequence_leaves_out_first_and_last():
    h, w = 40, 40
    obj = _square(h, w, 10, 10, 12).astype(np.uint8)
    gt = np.stack([obj] * 5)
    pred = gt.copy()
    pred[0] = 0
    pred[4] = 0  # first and last wrong: not counted
    r = evaluate_sequence(gt, pred, 1)
    assert r[1]["J"].tolist() == [1.0, 1.0, 1.0] and r[1]["F"].tolist() == [1.0, 1.0, 1.0]
    pred[2] = 0  # a middle frame wrong: counted
    r = evaluate_sequence(gt, pred, 1)
    assert r[1]["J"].tolist() == [1.0, 0.0, 1.0]
    figs = object_figures(r[1])
    assert figs["J-Mean"] == pytest.approx(2 / 3) and figs["J-Recall"] == pytest.approx(2 / 3)


def test_evaluate_sequence_objects_and_void():
    gt = np.zeros((4, 30, 30), np.uint8)
    gt[:, 2:10, 2:10] = 1
    gt[:, 15:25, 15:25] = 2
    gt[:, 0, :] = 255  # void row
    pred = gt.copy()
    pred[pred == 255] = 0
    pred[:, 15:25, 15:25] = 0  # object 2 lost
    r = evaluate_sequence(gt, pred, 2)
    assert r[1]["J"].tolist() == [1.0, 1.0] and r[2]["J"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="object 3"):
        evaluate_sequence(gt, np.where(gt == 2, 3, 0).astype(np.uint8), 2)


def test_summarise_means_over_objects():
    per = {"a_1": {"J-Mean": 0.5, "J-Recall": 1.0, "J-Decay": 0.1, "F-Mean": 0.7, "F-Recall": 0.0, "F-Decay": 0.2},
           "b_1": {"J-Mean": 0.9, "J-Recall": 0.0, "J-Decay": -0.1, "F-Mean": 0.3, "F-Recall": 1.0, "F-Decay": 0.0}}
    s = summarise(per)
    assert s["J-Mean"] == pytest.approx(0.7) and s["F-Mean"] == pytest.approx(0.5)
    assert s["J&F-Mean"] == pytest.approx(0.6) and s["J-Decay"] == pytest.approx(0.0)
    assert math.isclose(s["F-Decay"], 0.1)
