"""PCK: hand-computed thresholds (original pixels, box max side), per-keypoint vs per-image, categories."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fovea.eval.correspondence.metrics import bbox_max_side, correct_mask, pck, pck_table, pck_threshold


def test_threshold_is_alpha_times_the_box_max_side_in_original_pixels() -> None:
    # a non-square box 300 wide, 120 high (in a 640 x 480 image): threshold at 0.1 = 30 px, whatever the
    # resized square size the matching used
    box = [100, 200, 400, 320]
    assert bbox_max_side(box) == 300
    assert pck_threshold(box, 0.1) == pytest.approx(30.0)
    assert pck_threshold([10, 0, 50, 90], 0.05) == pytest.approx(4.5)  # tall box: the height counts


def test_correct_mask_hand_case_strictly_below() -> None:
    true = np.array([[100.0, 100.0], [50.0, 60.0], [0.0, 0.0], [10.0, 10.0]])
    pred = np.array([[118.0, 124.0],   # distance 30: NOT below 30
                     [50.0, 89.9],     # 29.9 < 30
                     [3.0, 4.0],       # 5
                     [40.0, 50.0]])    # 50
    assert correct_mask(pred, true, 30.0).tolist() == [False, True, True, False]


def test_per_keypoint_and_per_image_differ_on_a_hand_case() -> None:
    # pair 1: 1 of 4 correct (25 %), pair 2: 2 of 2 correct (100 %)
    c = [np.array([True, False, False, False]), np.array([True, True])]
    r = pck(c, ["x", "x"])
    assert r["per_keypoint"] == pytest.approx(100 * 3 / 6)   # 50.0
    assert r["per_image"] == pytest.approx((25 + 100) / 2)   # 62.5
    assert r["n_pairs"] == 2 and r["n_keypoints"] == 6


def test_per_category_breakdown() -> None:
    c = [np.array([True, False]), np.array([False, False, False]), np.array([True]), np.array([True, True, False, False])]
    cats = ["dog", "cat", "dog", "cat"]
    r = pck(c, cats)
    assert list(r["per_category"]) == ["cat", "dog"]
    cat, dog = r["per_category"]["cat"], r["per_category"]["dog"]
    assert cat["per_keypoint"] == pytest.approx(100 * 2 / 7) and cat["per_image"] == pytest.approx((0 + 50) / 2)
    assert dog["per_keypoint"] == pytest.approx(100 * 2 / 3) and dog["per_image"] == pytest.approx((50 + 100) / 2)
    assert cat["n_pairs"] == 2 and dog["n_keypoints"] == 3
    assert r["per_keypoint"] == pytest.approx(100 * 4 / 10)
    assert r["per_image"] == pytest.approx((50 + 0 + 100 + 50) / 4)


def test_pck_table_keys_and_brute_force_rederivation() -> None:
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(30):
        k = int(rng.integers(1, 12))
        box = np.sort(rng.uniform(0, 500, 2)).tolist() + np.sort(rng.uniform(0, 300, 2)).tolist()
        box = [box[0], box[2], box[1], box[3]]
        true = rng.uniform(0, 400, (k, 2))
        pairs.append((rng.choice(["a", "b", "c"]), box, true + rng.normal(0, 20, (k, 2)), true))
    alphas = [0.05, 0.1, 0.15]
    table = pck_table({a: [correct_mask(p, t, pck_threshold(b, a)) for _, b, p, t in pairs] for a in alphas},
                      [c for c, *_ in pairs])
    assert list(table) == ["pck@0.05", "pck@0.1", "pck@0.15"]
    for a in alphas:
        # written differently: float64 loops over every keypoint
        hits = tot = 0
        fr = []
        for _, b, p, t in pairs:
            thr = a * max(b[2] - b[0], b[3] - b[1])
            ok = [math.hypot(p[i][0] - t[i][0], p[i][1] - t[i][1]) < thr for i in range(len(t))]
            hits, tot = hits + sum(ok), tot + len(ok)
            fr.append(sum(ok) / len(ok))
        assert table[f"pck@{a:g}"]["per_keypoint"] == pytest.approx(100 * hits / tot)
        assert table[f"pck@{a:g}"]["per_image"] == pytest.approx(100 * sum(fr) / len(fr))


def test_pck_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        pck([np.array([True])], [])
