"""The ``fovea curate`` command (see :mod:`fovea.curate.run`)."""
from __future__ import annotations

import argparse
import json
import sys

SPEC = "fmnist:train|test[:DIR], parquet:FILE, folder:DIR, webdataset:SHARDS or manifest:DIR"


def cmd_curate(args: argparse.Namespace) -> int:
    from fovea.curate.run import CurateOptions, curate
    opt = CurateOptions(pool=args.pool, queries=args.queries, model=args.model, out=args.out, exclude=args.exclude,
                        dedup_model=args.dedup_model,
                        dedup_threshold=args.dedup_threshold, dedup_k=args.dedup_k,
                        dedup_rule=args.dedup_groups, exclude_threshold=args.exclude_threshold, clusters=args.clusters,
                        per_query=args.per_query, per_cluster=args.per_cluster, feature=args.features,
                        size=args.size, batch_size=args.batch_size, workers=args.workers, device=args.device,
                        cache=args.cache, seed=args.seed, which=args.which, progress=not args.json)
    s = curate(opt)
    for w in s.get("warnings", []):
        print(f"[fovea] warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(s))
        return 0
    p = s["pool"]
    print(f"[fovea] pool {p['images']} images ({p['embedded']} readable): {p['duplicates_removed']} near-duplicates "
          f"removed ({p['duplicate_groups']} groups), {p['excluded']} copies of excluded sets removed, {p['kept']} "
          f"kept, {s['clusters']} clusters")
    print(f"[fovea] {s['retrieved']} images retrieved for {s['queries']['embedded']} queries ({s['rule']}) in "
          f"{sum(s['seconds'].values()):.1f} s")
    print(f"[fovea] manifest: {args.out}/manifest.parquet   (train on it: data.train.kind=manifest "
          f"data.train.path={args.out})")
    print(f"[fovea] report:   {args.out}/report.md, {args.out}/clusters.png, {args.out}/removed.parquet")
    return 0


def add_curate_command(sub: argparse._SubParsersAction) -> None:
    from fovea.eval.commands import add_backbone_options
    c = sub.add_parser(
        "curate", help="retrieve a curated training set from an uncurated pool (DINOv2's LVD pipeline)",
        description="Embed the pool, the queries and the --exclude sets with a frozen backbone (batched, cached in "
        "OUT/cache), remove pool images that copy an --exclude image and near-duplicates within the rest of the "
        "pool (cosine above --dedup-threshold to one of an image's --dedup-k nearest neighbours; one image kept "
        "per group), "
        "k-means the rest with FAISS (spherical; more --clusters values cluster the previous level's centroids), "
        "then retrieve for each query its --per-query nearest pool images or --per-cluster images drawn from its "
        "nearest cluster. Writes OUT/manifest.parquet (one row per kept image: source, index, path, label, "
        "cluster, query, similarity, reason), OUT/removed.parquet, OUT/report.md and OUT/clusters.png. "
        "Train on the result with data.train.kind=manifest data.train.path=OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("--pool", nargs="+", required=True, metavar="SPEC", help=f"the uncurated images ({SPEC})")
    c.add_argument("--queries", required=True, metavar="SPEC", help="the curated examples to retrieve around")
    c.add_argument("--model", required=True, metavar="MODEL",
                   help="run folder, imported folder, checkpoint, backbone.safetensors or released file")
    c.add_argument("--out", required=True, metavar="DIR", help="output folder")
    c.add_argument("--dedup-model", default="", metavar="MODEL", help="a separate embedding for the copy-detection "
                   "steps (--exclude and near-duplicates; LVD-142M used a copy-detection model); default: --model")
    c.add_argument("--exclude", nargs="*", default=[], metavar="SPEC",
                   help="evaluation sets: pool images with cosine above --exclude-threshold to one of them are removed")
    c.add_argument("--dedup-threshold", type=float, default=0.95, help="cosine similarity above which two images "
                   "are near-duplicates")
    c.add_argument("--exclude-threshold", type=float, default=None, help="cosine similarity above which a pool "
                   "image copies an --exclude image (default: --dedup-threshold)")
    c.add_argument("--dedup-k", type=int, default=8, help="nearest neighbours examined per pool image")
    c.add_argument("--dedup-groups", choices=["greedy", "components"], default="greedy",
                   help="greedy: in pool order, an image is removed when it duplicates an image kept before it; "
                   "components: one image kept per connected group of duplicates (transitive: chains of similar "
                   "images join, which a weak embedding turns into most of the pool)")
    c.add_argument("--clusters", type=int, nargs="+", default=[100], metavar="K",
                   help="k-means clusters, finest level first (e.g. 1000 100: 1000 clusters, then 100 of them)")
    rule = c.add_mutually_exclusive_group()
    rule.add_argument("--per-query", type=int, default=0, metavar="N",
                      help="retrieve each query's N nearest pool images (default rule, N=4)")
    rule.add_argument("--per-cluster", type=int, default=0, metavar="M",
                      help="retrieve M random images of each query's nearest cluster (small query sets)")
    c.add_argument("--features", default="cls", help="embedding: cls, mean_patch, both, cls_last4, ... (KIND@W: "
                   "the first W channels)")
    c.add_argument("--size", type=int, default=0, help="input size in px (0 = the model's eval size)")
    c.add_argument("--cache", default="", help="embedding cache folder (default OUT/cache)")
    c.add_argument("--seed", type=int, default=0, help="seed of k-means and --per-cluster draws")
    c.add_argument("--json", action="store_true", help="print the summary as JSON instead of progress bars")
    add_backbone_options(c)
    c.set_defaults(func=cmd_curate)
