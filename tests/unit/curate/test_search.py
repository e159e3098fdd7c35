"""FAISS stages of ``fovea curate`` on hand-built embeddings: duplicate groups, the IVF index against the exact
one, k-means levels, and both retrieval rules."""
from __future__ import annotations

import numpy as np
import pytest

from fovea.curate import search as S


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_duplicate_groups_by_hand() -> None:
    # 0 ~ 3 (cos 0.995), 3 ~ 5 (cos 0.995), 0 and 5 apart (cos 0.98); 1 and 2 far apart; 4 = exact copy of 2
    a, b, c = np.eye(3, dtype=np.float32)
    near = lambda v, w, t: np.cos(t) * v + np.sin(t) * w  # noqa: E731 - angle t from v towards w
    x = unit(np.stack([a, b, c, near(a, b, 0.1), c, near(a, b, 0.2)]))
    # transitive: one chain {0, 3, 5}, its first member kept
    d = S.duplicate_groups(x, threshold=0.99, k=3, rule="components")
    assert d.group.tolist() == [0, 1, 2, 0, 2, 0]
    assert d.removed.tolist() == [False, False, False, True, True, True]
    assert d.n_groups == 2
    # greedy: 3 goes with 0; 5 duplicates only the removed 3, so it stays
    d = S.duplicate_groups(x, threshold=0.99, k=3)
    assert d.group.tolist() == [0, 1, 2, 0, 2, 5]
    assert d.similarity[4] == pytest.approx(1.0, abs=1e-6)
    assert d.similarity[3] == pytest.approx(np.cos(0.1), abs=1e-5)
    assert d.similarity[1] == -np.inf and d.similarity[5] == -np.inf  # nothing removed them
    # a stricter threshold breaks the chain's links (cos 0.1 rad = 0.995 < 0.999) but keeps the exact copy
    for rule in ("greedy", "components"):
        d = S.duplicate_groups(x, threshold=0.999, k=3, rule=rule)
        assert d.removed.tolist() == [False, False, False, False, True, False]


def test_greedy_duplicates_match_a_brute_force_pass() -> None:
    rng = np.random.default_rng(4)
    x = unit(np.repeat(rng.normal(size=(40, 6)), 3, axis=0) + 0.15 * rng.normal(size=(120, 6)))
    d = S.duplicate_groups(x, threshold=0.97, k=119)  # every pair is examined
    sims = x @ x.T
    keep: list[int] = []
    want = np.arange(120)
    for i in range(120):  # in order: an item is removed when it is close to an item kept before it
        close = [j for j in keep if sims[i, j] > 0.97]
        if close:
            want[i] = close[0]
        else:
            keep.append(i)
    assert d.removed.sum() > 10 and np.array_equal(d.removed, want != np.arange(120))


def test_ivf_index_finds_what_the_flat_index_finds() -> None:
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(50, 16)))
    x = unit(np.repeat(centres, 40, axis=0) + 0.05 * rng.normal(size=(2000, 16)).astype(np.float32))
    flat = S.build_index(x)
    ivf = S.build_index(x, flat_max=100)  # forces the IVF index
    assert type(flat).__name__ == "IndexFlatIP" and type(ivf).__name__ == "IndexIVFFlat"
    q = x[::37]
    _, i_flat = S.search(flat, q, 5)
    _, i_ivf = S.search(ivf, q, 5)
    assert (i_flat[:, 0] == np.arange(0, 2000, 37)).all()  # every point finds itself first
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i_flat, i_ivf, strict=True)])
    assert recall > 0.95


def test_subset_reads_only_its_rows() -> None:
    x = unit(np.random.default_rng(1).normal(size=(10, 4)))
    sub = S.Subset(x, np.array([7, 2, 5]))
    assert sub.shape == (3, 4)
    assert np.array_equal(sub[1:3], x[[2, 5]]) and np.array_equal(sub[np.array([2, 0])], x[[5, 7]])


def test_hierarchical_kmeans_levels_are_consistent() -> None:
    rng = np.random.default_rng(2)
    # 12 tight clusters around random directions
    mids = unit(rng.normal(size=(12, 8)))
    x = unit(np.repeat(mids, 60, axis=0) + 0.02 * rng.normal(size=(720, 8)))
    cents, assign = S.hierarchical_kmeans(x, [12, 4], seed=0)
    assert [c.shape for c in cents] == [(12, 8), (4, 8)]
    np.testing.assert_allclose(np.linalg.norm(cents[0], axis=1), 1, atol=1e-5)
    # level 1 of a point is the level-1 cluster of its level-0 centroid
    _, c_up = S.nearest(cents[0], cents[1])
    assert np.array_equal(assign[1], c_up[assign[0]])
    # the 12 tight clusters are found exactly (each holds its 60 points)
    truth = np.repeat(np.arange(12), 60)
    assert all(len(set(assign[0][truth == g])) == 1 for g in range(12))
    assert sorted(np.bincount(assign[0], minlength=12).tolist()) == [60] * 12


def test_retrieve_per_query_by_hand() -> None:
    pool = unit(np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]]))
    queries = unit(np.array([[1, 0.05], [0.05, 1], [0.95, 0.05]]))
    got = S.retrieve_per_query(pool, queries, 2)
    # query 0 -> {0, 1}; query 1 -> {2, 3}; query 2 -> {0, 1}: union {0, 1, 2, 3}, never item 4
    assert got.items.tolist() == [0, 1, 2, 3]
    sims = queries @ pool.T
    for item, q, s, r in zip(got.items, got.query, got.similarity, got.rank, strict=True):
        best = int(np.argmax(np.where(np.isin(np.arange(3), [0, 2] if item < 2 else [1]), sims[:, item], -9)))
        assert q == best and s == pytest.approx(sims[best, item], abs=1e-6)
        assert r == int((sims[q] > sims[q, item] + 1e-7).sum())  # rank among that query's neighbours


def test_retrieve_per_cluster_draws_from_the_nearest_cluster() -> None:
    rng = np.random.default_rng(3)
    cents = unit(np.eye(4, dtype=np.float32))
    assign = np.repeat(np.arange(4), [30, 2, 25, 10])
    pool = unit(cents[assign] + 0.05 * rng.normal(size=(len(assign), 4)))
    queries = unit(np.array([[1, 0.1, 0, 0], [0, 1, 0.1, 0], [0.1, 0, 0, 1]]))
    got = S.retrieve_per_cluster(pool, queries, cents, assign, m=5, seed=0)
    per_cluster = np.bincount(assign[got.items], minlength=4)
    assert per_cluster.tolist() == [5, 2, 0, 5]  # m from each query's cluster; all of a smaller one
    assert (got.rank == -1).all()
    np.testing.assert_allclose(got.similarity, (pool[got.items] * queries[got.query]).sum(1), atol=1e-6)
