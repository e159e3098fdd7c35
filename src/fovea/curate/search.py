"""FAISS work of ``fovea curate`` (METHODS.md section 3, LVD-142M): indexes chosen by size, batched
searches, near-duplicate groups, (hierarchical) spherical k-means and the two retrieval rules.

Every function takes L2-normalised float32 embeddings ``[N, D]`` (an array or a memory map: they are read
in batches) and works in cosine similarity (inner product).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: pools up to this size get an exact (flat) index; larger ones an IVF index
FLAT_MAX = 1_000_000
BATCH = 65536


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("fovea curate needs FAISS: pip install faiss-cpu") from e
    return faiss


def chunks(n: int, size: int = BATCH) -> Iterator[slice]:
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))


class Subset:
    """Rows ``ids`` of ``x`` (an array or memory map) as an array-like: ``shape`` and indexing by slices or
    index arrays, read on demand (nothing is copied up front)."""

    def __init__(self, x: np.ndarray | Subset, ids: np.ndarray) -> None:
        self.x, self.ids = x, np.asarray(ids, np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), int(self.x.shape[1])

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        return np.asarray(self.x[self.ids[key]])


Rows = np.ndarray | Subset


def rows(x: Rows, sl: slice) -> np.ndarray:
    return np.ascontiguousarray(x[sl], dtype=np.float32)


def build_index(x: Rows, seed: int = 0, flat_max: int = FLAT_MAX, nprobe: int = 32):
    """An inner-product index over ``x``: exact (``IndexFlatIP``) up to ``flat_max`` rows; above, an
    ``IndexIVFFlat`` with 4 sqrt(N) lists, trained on a sample of 64 points per list, searched with
    ``nprobe`` lists. Rows are added in batches."""
    faiss = _faiss()
    n, d = x.shape
    if n <= flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * math.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(np.ascontiguousarray(x[sample], dtype=np.float32))
        index.nprobe = nprobe
    for sl in chunks(n):
        index.add(rows(x, sl))
    return index


def search(index, x: Rows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (similarities [N, k] float32, ids [N, k] int64; -1 where fewer exist) of every row of ``x``."""
    n = x.shape[0]
    sims, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    for sl in chunks(n):
        s, i = index.search(rows(x, sl), k)
        sims[sl], ids[sl] = s, i
    return sims, ids


@dataclass
class Duplicates:
    """Near-duplicate groups of a pool: ``group[i]`` is the kept item that item i duplicates (i itself when
    it is kept), ``similarity[i]`` the similarity that linked it (-inf when nothing did); an item is
    removed when ``group[i] != i``."""

    group: np.ndarray
    similarity: np.ndarray

    @property
    def removed(self) -> np.ndarray:
        return self.group != np.arange(len(self.group))

    @property
    def n_groups(self) -> int:
        """Groups of two or more items."""
        g = self.group[self.removed]
        return int(len(np.unique(g)))


def _edges(x: Rows, threshold: float, k: int, index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (lo < hi) among each item's ``k`` nearest neighbours with similarity above ``threshold``."""
    n = x.shape[0]
    index = index if index is not None else build_index(x)
    sims, ids = search(index, x, min(k + 1, n))
    src = np.repeat(np.arange(n), sims.shape[1])
    dst, val = ids.reshape(-1), sims.reshape(-1)
    ok = (val > threshold) & (dst != src) & (dst >= 0)
    lo, hi, val = np.minimum(src[ok], dst[ok]), np.maximum(src[ok], dst[ok]), val[ok]
    order = np.lexsort((-val, hi, lo))
    lo, hi, val = lo[order], hi[order], val[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], val[first]


def duplicate_groups(x: Rows, threshold: float, k: int = 8, index=None, rule: str = "greedy") -> Duplicates:
    """Near-duplicates: item pairs among each item's ``k`` nearest neighbours with cosine above ``threshold``.

    ``greedy``: in pool order, each kept item removes the later items linked to it (an item removed this way
    removes nothing, so a chain a~b~c with a and c apart keeps a and c). ``components``: the connected
    components of the links, the first item of each kept (transitive: with a weak descriptor, chains can
    join most of a pool into one group)."""
    n = x.shape[0]
    lo, hi, val = _edges(x, threshold, k, index)
    if rule == "components":
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        best = np.full(n, -np.inf, np.float32)
        np.maximum.at(best, lo, val)
        np.maximum.at(best, hi, val)
        _, label = connected_components(coo_matrix((np.ones(len(lo), np.int8), (lo, hi)), shape=(n, n)), directed=False)
        first = np.full(label.max() + 1, n, np.int64)
        np.minimum.at(first, label, np.arange(n))
        return Duplicates(first[label], best)
    if rule != "greedy":
        raise ValueError(f"dedup rule {rule!r}: greedy or components")
    group, sim = np.arange(n), np.full(n, -np.inf, np.float32)
    for a, b, v in zip(lo.tolist(), hi.tolist(), val.tolist(), strict=True):  # sorted by lo, best link first
        if group[a] == a and group[b] == b:
            group[b], sim[b] = a, v
    return Duplicates(group, sim)


def nearest(x: Rows, ref: Rows) -> tuple[np.ndarray, np.ndarray]:
    """(similarity [N], index [N]) of the nearest row of ``ref`` to each row of ``x``."""
    sims, ids = search(build_index(ref), x, 1)
    return sims[:, 0], ids[:, 0]


#: k-means++ seeding up to this many clusters (above, FAISS's random seeding)
PLUSPLUS_MAX = 2048


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) of ``k`` centroids among the rows of ``x`` [n, D] (unit vectors)."""
    n = x.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = np.maximum(2 - 2 * (x @ x[chosen[0]]), 0).astype(np.float64)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(n, p=d2 / total)) if total > 0 else int(rng.integers(n))
        chosen.append(i)
        d2 = np.minimum(d2, np.maximum(2 - 2 * (x @ x[i]), 0))
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def kmeans(x: Rows, k: int, seed: int = 0, niter: int = 20, max_points: int = 256) -> np.ndarray:
    """Spherical k-means centroids [k, D] (L2-normalised) by FAISS, trained on a random sample of at most
    ``max_points`` points per centroid, seeded by k-means++ (up to :data:`PLUSPLUS_MAX` clusters)."""
    faiss = _faiss()
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"--clusters {k}: needs 1 <= k <= {n} (the images left after de-duplication)")
    rng = np.random.default_rng(seed)
    take = min(n, k * max_points)
    sample = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
    pts = np.ascontiguousarray(x[sample], dtype=np.float32)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=max_points,
                      verbose=False)
    if k <= PLUSPLUS_MAX:
        seed_pts = pts if len(pts) <= 64 * k else pts[np.sort(rng.choice(len(pts), size=64 * k, replace=False))]
        km.train(pts, init_centroids=kmeans_pp(seed_pts, k, rng))
    else:
        km.train(pts)
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def hierarchical_kmeans(x: Rows, ks: list[int], seed: int = 0, niter: int = 20
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Level 0: ``ks[0]`` clusters of the points; level l: ``ks[l]`` clusters of the level l-1 centroids.
    Returns (centroids per level, assignment of every point per level)."""
    cents: list[np.ndarray] = []
    assign: list[np.ndarray] = []
    points: Rows = x
    for level, k in enumerate(ks):
        c = kmeans(points, k, seed + level, niter, max_points=256 if level == 0 else max(1, points.shape[0] // k))
        cents.append(c)
        _, a = nearest(points, c)
        assign.append(a if level == 0 else a[assign[-1]])
        points = c
    return cents, assign


@dataclass
class Retrieved:
    """Pool items retrieved for the queries: ``items`` (sorted pool indices), and per item the query that
    retrieved it with the highest similarity, that similarity and the rank of the item for that query
    (per-query; -1 for per-cluster)."""

    items: np.ndarray
    query: np.ndarray
    similarity: np.ndarray
    rank: np.ndarray


def _best(items: np.ndarray, query: np.ndarray, sim: np.ndarray, rank: np.ndarray) -> Retrieved:
    order = np.lexsort((-sim, items))  # by item, best similarity first
    items, query, sim, rank = items[order], query[order], sim[order], rank[order]
    first = np.ones(len(items), bool)
    first[1:] = items[1:] != items[:-1]
    return Retrieved(items[first], query[first], sim[first], rank[first])


def retrieve_per_query(pool: Rows, queries: Rows, n: int, index=None) -> Retrieved:
    """The ``n`` nearest pool items of each query (union over queries)."""
    index = index if index is not None else build_index(pool)
    sims, ids = search(index, queries, min(n, pool.shape[0]))
    q = np.repeat(np.arange(queries.shape[0]), sims.shape[1])
    r = np.tile(np.arange(sims.shape[1]), queries.shape[0])
    ok = ids.reshape(-1) >= 0
    return _best(ids.reshape(-1)[ok], q[ok], sims.reshape(-1)[ok], r[ok])


def retrieve_per_cluster(pool: Rows, queries: Rows, centroids: np.ndarray, assign: np.ndarray,
                         m: int, seed: int = 0) -> Retrieved:
    """``m`` pool items drawn at random (seeded) from the nearest cluster of each query (the whole cluster
    when it is smaller); union over queries, each item credited to its most similar query."""
    _, cq = nearest(queries, centroids)
    members = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[members], np.arange(centroids.shape[0] + 1))
    rng = np.random.default_rng(seed)
    items, qs = [], []
    for qi, c in enumerate(cq):
        mem = members[bounds[c]:bounds[c + 1]]
        pick = mem if len(mem) <= m else np.sort(rng.choice(mem, size=m, replace=False))
        items.append(pick)
        qs.append(np.full(len(pick), qi, np.int64))
    it, q = np.concatenate(items), np.concatenate(qs)
    sim = np.empty(len(it), np.float32)
    for sl in chunks(len(it)):
        sim[sl] = (np.asarray(pool[it[sl]], np.float32) * np.asarray(queries[q[sl]], np.float32)).sum(1)
    return _best(it, q, sim, np.full(len(it), -1, np.int64))
