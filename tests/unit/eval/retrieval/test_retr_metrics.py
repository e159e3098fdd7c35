"""revisitop's trapezoid AP and capped mP@k on hand-made rankings with junk, a float64 brute-force
re-derivation on random rankings, the difference to sklearn's AP, queries without positives, setups,
the copy-detection single-positive AP."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fovea.eval.retrieval.metrics import (compute_map, cosine_ranks, positive_positions, query_scores,
                                          ranks_from_similarity, revisited_setups, score_setups,
                                          single_positive_ap, trapezoid_ap)

# ranking of 6 database images: 3 (neg), 0 (pos), 5 (junk), 1 (pos), 4 (neg), 2 (pos)
RANKING = np.array([3, 0, 5, 1, 4, 2])
POS, JUNK = [0, 1, 2], [5]


def test_hand_ranking_with_junk() -> None:
    # junk removed: [3, 0, 1, 4, 2] -> positives at 0-based positions 1, 2, 4
    assert positive_positions(RANKING, POS, JUNK).tolist() == [1, 2, 4]
    ap, pr = query_scores(RANKING, POS, JUNK, ks=(1, 5, 10))  # type: ignore[misc]
    # trapezoids: j=0 r=1: (0/1 + 1/2)/2 = 0.25; j=1 r=2: (1/2 + 2/3)/2 = 7/12; j=2 r=4: (2/4 + 3/5)/2 = 0.55
    assert ap == pytest.approx((0.25 + 7 / 12 + 0.55) / 3)  # 0.461111
    # 1-based positions 2, 3, 5; last positive at 5:
    # mP@1: k'=1, 0/1 = 0; mP@5: k'=5, 3/5; mP@10: k'=min(10, 5)=5 -> 3/5 (uncapped it would be 3/10)
    assert pr.tolist() == pytest.approx([0.0, 0.6, 0.6])
    # without removing the junk the positives sit at 1, 3, 5: a different AP
    ap_nojunk, _ = query_scores(RANKING, POS, [], ks=(1,))  # type: ignore[misc]
    assert ap_nojunk == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2 + (2 / 5 + 3 / 6) / 2) / 3)


def test_first_position_and_cap_lifting_a_single_positive() -> None:
    # one positive at position 0: AP = (1 + 1/1)/2 = 1; every mP@k: k'=1 -> 1
    ap, pr = query_scores(np.array([7, 1, 2]), [7], [], ks=(1, 5, 10))  # type: ignore[misc]
    assert ap == 1.0 and pr.tolist() == [1.0, 1.0, 1.0]
    # one positive at 1-based position 3 behind a junk at 1: junk-free position 2 (0-based 1)
    # AP = (0/1 + 1/2)/2 / 1 = 0.25; mP@1 = 0; mP@5: k'=min(5, 2)=2 -> 1/2
    ap, pr = query_scores(np.array([9, 4, 7, 1]), [7], [9], ks=(1, 5))  # type: ignore[misc]
    assert ap == pytest.approx(0.25) and pr.tolist() == pytest.approx([0.0, 0.5])


def test_queries_without_positives_are_left_out() -> None:
    ranks = np.stack([RANKING, np.array([2, 0, 1, 3, 4, 5]), np.array([0, 1, 2, 3, 4, 5])], axis=1)
    gnd = [{"ok": POS, "junk": JUNK}, {"ok": [2], "junk": []}, {"ok": [], "junk": [0]}]
    m = compute_map(ranks, gnd, ks=(1, 5, 10))
    assert m["n_queries"] == 2 and m["n_without_positives"] == 1
    assert np.isnan(m["aps"][2])
    assert m["mAP"] == pytest.approx((0.461111111 + 1.0) / 2)  # not divided by 3
    assert m["mP@10"] == pytest.approx((0.6 + 1.0) / 2)
    assert m["mP@1"] == pytest.approx(0.5)


def test_positive_missing_from_a_truncated_ranking_counts() -> None:
    # ranks hold only the top 3 of 6; positive 2 is never reached: n_positives stays 3
    ranks = RANKING[:3, None]
    m = compute_map(ranks, [{"ok": POS, "junk": JUNK}])
    assert m["mAP"] == pytest.approx(0.25 / 3)


def test_ap_differs_from_sklearn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    kept = [d for d in RANKING if d not in JUNK]  # [3, 0, 1, 4, 2]
    y = np.array([d in POS for d in kept], dtype=int)
    scores = -np.arange(len(kept), dtype=float)
    ap_sklearn = sk.average_precision_score(y, scores)  # (1/2 + 2/3 + 3/5) / 3 = 0.588889
    assert ap_sklearn == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    ap = trapezoid_ap(positive_positions(RANKING, POS, JUNK), 3)
    assert abs(ap - ap_sklearn) > 0.1  # 0.4611 vs 0.5889


def _brute(ranking: np.ndarray, ok: set[int], junk: set[int], ks: tuple[int, ...]) -> tuple[float, list[float]]:
    """Walk the ranking once in float64: precision just before and just after each positive (junk skipped)."""
    seen = tp = 0
    area = np.float64(0)
    hits: list[int] = []  # 1-based positions among the non-junk
    for d in ranking.tolist():
        if d in junk:
            continue
        left = np.float64(1.0) if seen == 0 else np.float64(tp) / seen
        seen += 1
        if d in ok:
            tp += 1
            hits.append(seen)
            area += (left + np.float64(tp) / seen) / 2 * (np.float64(1) / len(ok))
    prec = []
    for k in ks:
        if not hits:
            prec.append(0.0)
            continue
        cut = min(k, hits[-1])
        prec.append(sum(1 for h in hits if h <= cut) / cut)
    return float(area), prec


def test_random_rankings_against_a_brute_force_walk() -> None:
    rng = np.random.default_rng(1)
    n_db, n_q, ks = 40, 30, (1, 5, 10)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for q in range(n_q):
        perm = rng.permutation(n_db)
        n_ok, n_junk = (0 if q % 7 == 0 else int(rng.integers(1, 8))), int(rng.integers(0, 6))
        gnd.append({"ok": perm[:n_ok].tolist(), "junk": perm[n_ok:n_ok + n_junk].tolist()})
    m = compute_map(ranks, gnd, ks)
    aps, precs = [], []
    for q, g in enumerate(gnd):
        if not g["ok"]:
            continue
        a, p = _brute(ranks[:, q], set(g["ok"]), set(g["junk"]), ks)
        aps.append(a)
        precs.append(p)
    assert m["n_queries"] == len(aps) and m["n_without_positives"] == n_q - len(aps) > 0
    assert m["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
    for i, k in enumerate(ks):
        assert m[f"mP@{k}"] == pytest.approx(np.mean([p[i] for p in precs]), abs=1e-12)


def test_revisited_setups_and_percent_scores() -> None:
    g = [{"easy": [0], "hard": [1], "junk": [2]}, {"easy": [], "hard": [3], "junk": []}]
    s = revisited_setups(g)
    assert s["easy"][0] == {"ok": [0], "junk": [2, 1]} and s["medium"][0] == {"ok": [0, 1], "junk": [2]}
    assert s["hard"][0] == {"ok": [1], "junk": [2, 0]} and s["easy"][1]["ok"] == []
    ranks = np.array([[1, 3], [0, 0], [2, 1], [3, 2]])
    r = score_setups(ranks, s)
    # easy, query 0: ranking 1 (junk), 0 (pos) -> position 0 -> 100; query 1 left out
    assert r["easy"]["mAP"] == 100.0 and r["easy"]["n_queries"] == 1
    # hard, query 0: 1 (pos) at 0 -> 1; query 1: 3 (pos) at 0 -> 1
    assert r["hard"]["mAP"] == 100.0 and r["hard"]["n_queries"] == 2
    # medium, query 0: 1, 0 positives at 0, 1 -> 1
    assert r["medium"]["mP@10"] == 100.0


def test_ranking_from_similarity_is_stable_and_puts_invalid_last() -> None:
    sim = torch.tensor([[0.5, 0.1], [0.9, 0.1], [0.5, 0.3]])
    assert ranks_from_similarity(sim).T.tolist() == [[1, 0, 2], [2, 0, 1]]  # ties keep database order
    db = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]), dim=1)
    q = torch.tensor([[1.0, 0.0]])
    assert cosine_ranks(db, q)[:, 0].tolist() == [0, 2, 1]
    assert cosine_ranks(db, q, torch.tensor([False, True, True]))[:, 0].tolist() == [2, 1, 0]


def test_copy_detection_single_positive_ap_by_hand() -> None:
    # three copies whose original sits at 0-based ranks 0, 1 and 3
    ranks = np.array([[5, 2, 9], [1, 5, 8], [2, 7, 7], [0, 0, 4]])
    aps = single_positive_ap(ranks, np.array([5, 5, 4]))
    # r=0: 1; r=1: (0/1 + 1/2)/2 = 1/4; r=3: (0/3 + 1/4)/2 = 1/8
    assert aps.tolist() == pytest.approx([1.0, 0.25, 0.125])
    assert aps.mean() == pytest.approx(0.458333, abs=1e-6)  # mAP, not the 1/(r+1) mean 0.583
    for q in range(3):
        assert aps[q] == pytest.approx(compute_map(ranks[:, q:q + 1], [{"ok": [[5, 5, 4][q]]}])["mAP"])
