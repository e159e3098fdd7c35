"""``fovea curate``: a curated training set retrieved from an uncurated pool around a few query images
(the LVD-142M pipeline of DINOv2, METHODS.md section 3).

Stages: embed the pool, the queries and every ``--exclude`` set (batched, cached); remove pool images that
copy an excluded (evaluation) image (cosine above ``--exclude-threshold``, by default ``--dedup-threshold``); remove near-duplicates within the
rest (cosine above the threshold to one of an item's ``--dedup-k`` nearest neighbours; ``greedy``: in pool
order, an image is removed when it duplicates an image kept before it; ``components``: one image kept per
connected group, transitive); k-means the
rest (FAISS, spherical; further ``--clusters`` values cluster the previous level's centroids); retrieve for
each query its ``--per-query`` nearest pool images, or ``--per-cluster`` images drawn from its nearest
cluster. Outputs in ``--out``:

- ``manifest.parquet``: one row per kept image: ``source`` (the data spec), ``index`` (in that source),
  ``path`` (folder sources), ``label`` (-1 when none), ``cluster`` (and ``cluster_1``... for upper levels),
  ``query`` (index of its most similar query), ``similarity`` (cosine to it), ``reason``;
- ``removed.parquet``: every removed pool image, with what it duplicated or copied and the similarity;
- ``report.md`` (counts at each stage, timings) and ``clusters.png`` (sample images of the clusters that gave
  the most images). ``data.train.kind=manifest`` (or ``--data manifest:DIR``) trains on the result.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fovea.curate import search as S
from fovea.curate.embedding import Embedded, cache_key, embed_cached, model_key
from fovea.data.base import ImageSource


@dataclass
class CurateOptions:
    pool: list[str]
    queries: str
    model: str
    out: str
    dedup_model: str = ""  # the embedding of the copy-detection steps (default: model)
    exclude: list[str] = field(default_factory=list)
    dedup_threshold: float = 0.95
    dedup_k: int = 8
    dedup_rule: str = "greedy"
    exclude_threshold: float | None = None  # None: dedup_threshold
    clusters: list[int] = field(default_factory=lambda: [100])
    per_query: int = 0
    per_cluster: int = 0
    feature: str = "cls"
    size: int = 0
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    cache: str = ""
    seed: int = 0
    which: str = "teacher"
    samples_per_cluster: int = 10
    png_clusters: int = 12
    progress: bool = True


@dataclass
class Pool:
    """The pool specs concatenated: row r of ``x`` is item ``items[r]`` of source ``part[r]``."""

    parts: list[Embedded]
    x: np.ndarray | S.Subset
    part: np.ndarray
    items: np.ndarray

    @property
    def n(self) -> int:
        return len(self.part)


def _concat(parts: list[Embedded], out: Path, name: str = "pool_embeddings.npy") -> Pool:
    """One memory-mapped matrix of every pool row (written batch by batch when there are several parts)."""
    part = np.concatenate([np.full(len(p.items), i, np.int64) for i, p in enumerate(parts)])
    items = np.concatenate([p.items for p in parts])
    if len(parts) == 1:
        return Pool(parts, parts[0].x, part, items)
    d = parts[0].x.shape[1]
    if any(p.x.shape[1] != d for p in parts):
        raise ValueError("pool embeddings of different widths")
    path = out / name
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(part), d))
    r = 0
    for p in parts:
        for sl in S.chunks(len(p.items)):
            x[r + sl.start:r + sl.stop] = p.x[sl]
        r += len(p.items)
    x.flush()
    return Pool(parts, np.load(path, mmap_mode="r"), part, items)


def _resolve_spec(spec: str) -> str:
    """The spec with its path made absolute (the manifest must be readable from any directory)."""
    from fovea.data.sources import resolve_data_path
    from fovea.data.specs import parse_source_spec
    f = parse_source_spec(spec)
    if not f.get("path"):
        return spec
    path = str(Path(resolve_data_path(f["path"])).resolve())
    return f"fmnist:{f['split']}:{path}" if f["kind"] == "fmnist" else f"{f['kind']}:{path}"


def curate(opt: CurateOptions) -> dict:
    """Run the pipeline; returns the summary written to ``report.json``."""
    from fovea.core.distributed import check_device
    from fovea.data.specs import source_from_spec
    from fovea.hub.backbone import load_backbone

    if opt.per_query and opt.per_cluster:
        raise ValueError("--per-query and --per-cluster: choose one retrieval rule")
    if not opt.per_query and not opt.per_cluster:
        opt.per_query = 4  # the DINOv2 rule for large query sets
    ex_threshold = opt.dedup_threshold if opt.exclude_threshold is None else opt.exclude_threshold
    for name, t in (("--dedup-threshold", opt.dedup_threshold), ("--exclude-threshold", ex_threshold)):
        if not 0 < t <= 1.0001:
            raise ValueError(f"{name} {t}: a cosine similarity in (0, 1]")
    if not opt.clusters or any(k < 1 for k in opt.clusters):
        raise ValueError(f"--clusters {opt.clusters}: positive cluster counts, finest first")
    # every spec is read (and named in the error) before any work
    specs = {"pool": [_resolve_spec(s) for s in opt.pool], "queries": [_resolve_spec(opt.queries)],
             "exclude": [_resolve_spec(s) for s in opt.exclude]}
    sources: dict[str, ImageSource] = {}
    for what, group in specs.items():
        for spec in group:
            sources[spec] = source_from_spec(spec, what=f"--{what}")
    backbone, meta = load_backbone(opt.model, which=opt.which)
    check_device(opt.device)
    device = torch.device(opt.device if opt.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    crops = meta.get("crops", {}) or {}
    size = opt.size or crops.get("global_size") or backbone.cfg.img_size
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(opt.cache) if opt.cache else out / "cache"
    mkey = model_key(opt.model)
    times: dict[str, float] = {}

    def emb(spec: str, what: str, model: tuple = (backbone, crops, size, mkey)) -> Embedded:
        bb, cr, sz, key = model
        return embed_cached(bb, spec, sources[spec], cache, cache_key(key, spec, sz, opt.feature), opt.feature, sz,
                            device, opt.batch_size, opt.workers, cr.get("mean"), cr.get("std"), opt.progress, what)

    t0 = time.time()
    parts = [emb(s, "pool") for s in specs["pool"]]
    query = emb(specs["queries"][0], "queries")
    excl = [emb(s, "exclude") for s in specs["exclude"]]
    pool = _concat(parts, out)
    copy_pool, copy_excl = pool, excl  # the copy-detection steps' embeddings: --dedup-model's when given
    if opt.dedup_model:
        d_bb, d_meta = load_backbone(opt.dedup_model, which=opt.which)
        d_crops = d_meta.get("crops", {}) or {}
        d_model = (d_bb, d_crops, opt.size or d_crops.get("global_size") or d_bb.cfg.img_size,
                   model_key(opt.dedup_model))
        d_parts = [emb(s, "pool (copy detection)", d_model) for s in specs["pool"]]
        copy_excl = [emb(s, "exclude (copy detection)", d_model) for s in specs["exclude"]]
        copy_pool = _concat(d_parts, out, "dedup_embeddings.npy")
        if not np.array_equal(copy_pool.items, pool.items):
            raise ValueError("--dedup-model read other images than --model (unreadable images differ)")
    times["embed"] = time.time() - t0
    n = pool.n

    t0 = time.time()
    ex_hit = np.zeros(n, bool)
    ex_part, ex_item, ex_sim = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.full(n, -np.inf, np.float32)
    for j, e in enumerate(copy_excl):
        sim, idx = S.nearest(copy_pool.x, e.x)
        better = sim > ex_sim
        ex_sim[better], ex_part[better], ex_item[better] = sim[better], j, e.items[idx[better]]
        ex_hit |= sim > ex_threshold
    times["exclude"] = time.time() - t0
    t0 = time.time()
    alive = np.flatnonzero(~ex_hit)  # copies of evaluation images take no part in the pool's groups
    found = S.duplicate_groups(S.Subset(copy_pool.x, alive), opt.dedup_threshold, opt.dedup_k, rule=opt.dedup_rule)
    rep, dup_sim = np.arange(n), np.full(n, -np.inf, np.float32)
    rep[alive], dup_sim[alive] = alive[found.group], found.similarity
    dups = S.Duplicates(rep, dup_sim)
    removed_dup = dups.removed
    times["dedup"] = time.time() - t0
    kept = np.flatnonzero(~removed_dup & ~ex_hit)
    if not len(kept):
        raise ValueError(f"every pool image was removed ({int(ex_hit.sum())} as copies of --exclude images, "
                         f"{int(removed_dup.sum())} as near-duplicates): raise --exclude-threshold / --dedup-threshold")

    t0 = time.time()
    view = S.Subset(pool.x, kept)
    ks = [min(k, len(kept)) for k in opt.clusters]
    cents, assign = S.hierarchical_kmeans(view, ks, opt.seed)
    times["kmeans"] = time.time() - t0
    t0 = time.time()
    if opt.per_query:
        got = S.retrieve_per_query(view, query.x, opt.per_query)
        rule = f"per-query {opt.per_query}"
    else:
        got = S.retrieve_per_cluster(view, query.x, cents[0], assign[0], opt.per_cluster, opt.seed)
        rule = f"per-cluster {opt.per_cluster}"
    times["retrieve"] = time.time() - t0

    rows = kept[got.items]  # pool rows of the retrieved images
    q_items = query.items[got.query]
    reasons = [f"query {q} rank {r + 1}" if r >= 0 else f"cluster {c} of query {q}"
               for q, r, c in zip(q_items.tolist(), got.rank.tolist(), assign[0][got.items].tolist(), strict=True)]
    _write_manifest(out / "manifest.parquet", pool, rows, {f"cluster{'' if lv == 0 else f'_{lv}'}": a[got.items]
                                                          for lv, a in enumerate(assign)},
                    q_items, got.similarity, reasons)
    _write_removed(out / "removed.parquet", pool, dups, removed_dup, ex_hit, ex_part, ex_item, ex_sim, excl)
    summary = _summary(opt, pool, query, excl, dups, removed_dup, ex_hit, ex_part, kept, ks, assign, got, rows, rule, times,
                       size)
    _cluster_png(out / "clusters.png", pool, rows, assign[0][got.items], size, opt.png_clusters,
                 opt.samples_per_cluster, opt.seed)
    share = (removed_dup.sum() + ex_hit.sum()) / max(n, 1)
    summary["warnings"] = [] if share <= 0.5 else [
        f"{share:.0%} of the pool was removed as near-duplicates or copies of excluded images: the thresholds may "
        f"be too low for this embedding (--dedup-threshold {opt.dedup_threshold}, --exclude-threshold {ex_threshold}; "
        "the similarities are in removed.parquet)"]
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(_report_md(summary))
    del pool, copy_pool
    for name in ("pool_embeddings.npy", "dedup_embeddings.npy"):
        (out / name).unlink(missing_ok=True)
    return summary


def _identity(pool: Pool, rows: np.ndarray) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """(spec, index in the source, path or "", label) of pool rows."""
    specs = [pool.parts[p].spec for p in pool.part[rows].tolist()]
    items = pool.items[rows]
    paths, labels = [], np.empty(len(rows), np.int64)
    for k, (p, i) in enumerate(zip(pool.part[rows].tolist(), items.tolist(), strict=True)):
        src = pool.parts[p].source
        names = getattr(src, "paths", None)
        paths.append(names[i] if names is not None else "")
        labels[k] = src.labels[i]
    return specs, items, paths, labels


def _write_manifest(path: Path, pool: Pool, rows: np.ndarray, clusters: dict[str, np.ndarray], query: np.ndarray,
                    sim: np.ndarray, reasons: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    specs, items, paths, labels = _identity(pool, rows)
    cols = {"source": pa.array(specs, pa.string()), "index": pa.array(items, pa.int64()),
            "path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int64()),
            **{k: pa.array(v.astype(np.int64), pa.int64()) for k, v in clusters.items()},
            "query": pa.array(query.astype(np.int64), pa.int64()), "similarity": pa.array(sim.astype(np.float32)),
            "reason": pa.array(reasons, pa.string())}
    pq.write_table(pa.table(cols), str(path))


def _write_removed(path: Path, pool: Pool, dups: S.Duplicates, removed_dup: np.ndarray, ex_hit: np.ndarray,
                   ex_part: np.ndarray, ex_item: np.ndarray, ex_sim: np.ndarray, excl: list[Embedded]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = np.flatnonzero(removed_dup | ex_hit)
    specs, items, paths, labels = _identity(pool, rows)
    rep = dups.group[rows]
    rep_specs, rep_items, _, _ = _identity(pool, rep)
    reason, of_spec, of_index, sim = [], [], [], []
    for k, r in enumerate(rows.tolist()):
        if not ex_hit[r]:
            reason.append("duplicate")
            of_spec.append(rep_specs[k])
            of_index.append(int(rep_items[k]))
            sim.append(float(dups.similarity[r]))
        else:
            reason.append("excluded")
            of_spec.append(excl[int(ex_part[r])].spec)
            of_index.append(int(ex_item[r]))
            sim.append(float(ex_sim[r]))
    pq.write_table(pa.table({"source": pa.array(specs, pa.string()), "index": pa.array(items, pa.int64()),
                             "path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.int64()),
                             "reason": pa.array(reason, pa.string()), "of_source": pa.array(of_spec, pa.string()),
                             "of_index": pa.array(of_index, pa.int64()),
                             "similarity": pa.array(sim, pa.float32())}), str(path))


def _summary(opt: CurateOptions, pool: Pool, query: Embedded, excl: list[Embedded], dups: S.Duplicates,
             removed_dup: np.ndarray, ex_hit: np.ndarray, ex_part: np.ndarray, kept: np.ndarray, ks: list[int], assign: list[np.ndarray],
             got: S.Retrieved, rows: np.ndarray, rule: str, times: dict[str, float], size: int) -> dict:
    sizes = np.bincount(assign[0], minlength=ks[0])
    per_source = []
    for i, p in enumerate(pool.parts):
        mine = pool.part == i
        per_source.append({"spec": p.spec, "images": len(p.source), "unreadable": p.skipped,
                           "embedded": int(mine.sum()), "cached": p.cached,
                           "duplicates_removed": int((removed_dup & mine).sum()),
                           "excluded": int((ex_hit & mine).sum()),
                           "kept": int((~removed_dup & ~ex_hit & mine).sum()),
                           "retrieved": int((pool.part[rows] == i).sum())})
    ex_t = opt.dedup_threshold if opt.exclude_threshold is None else opt.exclude_threshold
    return {"model": opt.model, "dedup_model": opt.dedup_model or opt.model, "feature": opt.feature, "size": size,
            "dedup_threshold": opt.dedup_threshold,
            "exclude_threshold": ex_t,
            "dedup_k": opt.dedup_k, "dedup_rule": opt.dedup_rule, "rule": rule, "clusters": ks, "index": "flat" if pool.n <= S.FLAT_MAX else "ivf",
            "pool": {"images": int(sum(len(p.source) for p in pool.parts)), "embedded": pool.n,
                     "duplicates_removed": int(removed_dup.sum()), "duplicate_groups": dups.n_groups,
                     "excluded": int((ex_hit & ~removed_dup).sum()), "kept": len(kept), "sources": per_source},
            "exclude": [{"spec": e.spec, "images": len(e.source), "embedded": len(e.items),
                         "pool_matches": int((ex_hit & (ex_part == j)).sum())} for j, e in enumerate(excl)],
            "queries": {"spec": query.spec, "images": len(query.source), "embedded": len(query.items)},
            "cluster_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                              "empty": int((sizes == 0).sum())},
            "retrieved": len(got.items), "queries_with_results": len(np.unique(got.query)),
            "similarity": {"min": float(got.similarity.min()), "median": float(np.median(got.similarity)),
                           "max": float(got.similarity.max())},
            "seconds": {k: round(v, 2) for k, v in times.items()}}


def _report_md(s: dict) -> str:
    p, q, c, sim = s["pool"], s["queries"], s["cluster_sizes"], s["similarity"]
    warn = [f"**Warning**: {w}" for w in s.get("warnings", [])]
    copy = "" if s["dedup_model"] == s["model"] else f"; copy detection with `{s['dedup_model']}`"
    head = (f"Model `{s['model']}` ({s['feature']} at {s['size']} px){copy}; near-duplicates: cosine > "
            f"{s['dedup_threshold']} to one of the {s['dedup_k']} nearest ({s['dedup_rule']} groups); copies of "
            f"the excluded sets: cosine > {s['exclude_threshold']} to one of their images; {len(s['clusters'])}-level k-means "
            f"{s['clusters']}; retrieval {s['rule']}; {s['index']} index.")
    stages = [("pool", p["images"]), ("embedded (readable)", p["embedded"]),
              (f"near-duplicates removed ({p['duplicate_groups']} groups)", p["duplicates_removed"]),
              ("copies of excluded sets removed", p["excluded"]), ("kept for clustering", p["kept"]),
              ("retrieved (manifest.parquet)", s["retrieved"])]
    lines = [f"# fovea curate: {s['retrieved']} images", "", head, "", *warn, *([""] if warn else []),
             "| stage | images |", "|---|---|"]
    lines += [f"| {name} | {v} |" for name, v in stages]
    lines += ["", "| pool source | images | unreadable | duplicates | excluded | kept | retrieved |",
              "|---|---|---|---|---|---|---|"]
    for r in p["sources"]:
        lines.append(f"| `{r['spec']}` | {r['images']} | {r['unreadable']} | {r['duplicates_removed']} | "
                     f"{r['excluded']} | {r['kept']} | {r['retrieved']} |")
    excl = ", ".join(f"`{e['spec']}` ({e['embedded']} images, {e['pool_matches']} pool copies)" for e in s["exclude"])
    lines += ["", f"Queries `{q['spec']}`: {q['embedded']} embedded, {s['queries_with_results']} with results.",
              f"Exclude sets: {excl or 'none'}.",
              (f"Cluster sizes (level 0, {s['clusters'][0]} clusters): min {c['min']}, median {c['median']:g}, "
              f"max {c['max']}, {c['empty']} empty."),
              (f"Similarity of each retrieved image to its query: min {sim['min']:.3f}, median {sim['median']:.3f}, "
              f"max {sim['max']:.3f}."), "",
              "Seconds: " + ", ".join(f"{k} {v}" for k, v in s["seconds"].items()) + ".", "",
              "![sample images of the clusters that gave the most images](clusters.png)", "",
              "Each row of `clusters.png` is one cluster (those that gave the most images first).", ""]
    return "\n".join(lines)


def _cluster_png(path: Path, pool: Pool, rows: np.ndarray, cluster: np.ndarray, size: int, n_clusters: int,
                 per_row: int, seed: int) -> None:
    from fovea.data.augment import eval_transform
    from fovea.eval.pictures import save_grid
    ids, counts = np.unique(cluster, return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")][:n_clusters]
    rng = np.random.default_rng(seed)
    tile = max(32, min(96, size))
    grid = []
    for c in top.tolist():
        mem = rows[cluster == c]
        pick = mem if len(mem) <= per_row else rng.choice(mem, size=per_row, replace=False)
        row = []
        for r in pick.tolist():
            img = pool.parts[int(pool.part[r])].source.load(int(pool.items[r]))
            if img is not None:
                row.append(eval_transform(img, tile).permute(1, 2, 0).float() / 255)
        if row:
            grid.append(row)
    if grid:
        save_grid(grid, path)
