#!/usr/bin/env python
"""``fovea curate`` on a pool with known answers (issue 16): planted near-duplicates, copies of the test split,
an out-of-domain half.

    python benchmarks/curation.py build   --work runs/curation          # the pool and the queries (parquet)
    fovea curate --pool $(cat runs/curation/pool.txt) --queries parquet:runs/curation/queries.parquet \\
        --exclude parquet:$FOVEA_DATA/cifar10/test.parquet --model RUN --out runs/curation/curated
    python benchmarks/curation.py measure --work runs/curation --curated runs/curation/curated

The pool: CIFAR-10 train (50,000), Fashion-MNIST train as 32-px RGB (60,000, out of domain), 1,000 planted
near-duplicates (augmented copies of random CIFAR-10 train images: a random crop of 80-100 % of the area
resized back, a horizontal flip half of the time, brightness and contrast within +-10 %, JPEG quality 75) and
500 exact copies of CIFAR-10 test images. Queries: 1,000 random CIFAR-10 train images. ``build`` also writes
``raw/manifest.parquet`` (every pool image, the curate manifest's columns) so that the raw pool trains
through the same ``data.train.kind=manifest`` path as the curated set.

``measure`` reports: recall of the planted duplicates (share of planted copies removed as a duplicate of
their own original), precision (share of the images removed as duplicates that are planted copies: natural
near-duplicates of CIFAR-10 count against it), the share of the test copies removed, and the in-domain
share (CIFAR-10 sources) of the pool and of what was retrieved; prints a table and writes
``curation.json`` in ``--curated``.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np


def _png(img: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, blobs: list[bytes], labels: list[int], extra: dict[str, list[int]] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array([None] * len(blobs), pa.string())],
                                       names=["bytes", "path"])
    cols = {"image": image, "label": pa.array(labels, pa.int64())}
    cols.update({k: pa.array(v, pa.int64()) for k, v in (extra or {}).items()})
    pq.write_table(pa.table(cols), str(path), row_group_size=1000)


def near_duplicate(img: np.ndarray, rng: np.random.Generator) -> bytes:
    """An augmented copy: crop 80-100 % of the area (aspect 3/4-4/3) resized back, flip p 0.5,
    brightness/contrast +-10 %, JPEG quality 75."""
    from PIL import Image, ImageEnhance
    h, w = img.shape[:2]
    for _ in range(10):
        area = rng.uniform(0.8, 1.0) * h * w
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = int(round(np.sqrt(area / ar))), int(round(np.sqrt(area * ar)))
        if ch <= h and cw <= w:
            break
    else:
        ch, cw = h, w
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    pil = Image.fromarray(img[y:y + ch, x:x + cw]).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(0.9, 1.1))
    pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def build(work: Path, seed: int, n_dup: int, n_test: int, n_queries: int) -> None:
    from PIL import Image

    from fovea.data.sources import SourceConfig, build_source
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = build_source(SourceConfig(kind="parquet", path="$FOVEA_DATA/cifar10/train.parquet"))
    test = build_source(SourceConfig(kind="parquet", path="$FOVEA_DATA/cifar10/test.parquet"))
    fm = build_source(SourceConfig(kind="fmnist", split="train"))
    if not (work / "fmnist32.parquet").exists():
        blobs = [_png(np.asarray(Image.fromarray(fm.load(i)).convert("RGB").resize((32, 32), Image.BICUBIC)))
                 for i in range(len(fm))]
        _write(work / "fmnist32.parquet", blobs, [10 + int(v) for v in fm.labels])
    dup_of = np.sort(rng.choice(len(train), size=n_dup, replace=False))
    _write(work / "planted.parquet", [near_duplicate(train.load(int(i)), rng) for i in dup_of],
           [int(train.labels[i]) for i in dup_of], {"orig_index": dup_of.tolist()})
    test_of = np.sort(rng.choice(len(test), size=n_test, replace=False))
    _write(work / "testcopies.parquet", [_png(test.load(int(i))) for i in test_of],
           [int(test.labels[i]) for i in test_of], {"orig_index": test_of.tolist()})
    q_of = np.sort(rng.choice(len(train), size=n_queries, replace=False))
    _write(work / "queries.parquet", [_png(train.load(int(i))) for i in q_of], [int(train.labels[i]) for i in q_of],
           {"orig_index": q_of.tolist()})
    specs = [f"parquet:{train.path}", f"parquet:{(work / 'fmnist32.parquet').resolve()}",
             f"parquet:{(work / 'planted.parquet').resolve()}", f"parquet:{(work / 'testcopies.parquet').resolve()}"]
    (work / "pool.txt").write_text(" ".join(specs) + "\n")
    raw_manifest(work / "raw", specs)
    print(f"pool: {' '.join(specs)}\nqueries: parquet:{(work / 'queries.parquet').resolve()}")


def raw_manifest(out: Path, specs: list[str]) -> None:
    """Every pool image as a manifest (trains through the same path as the curated set)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fovea.data.specs import source_from_spec
    out.mkdir(parents=True, exist_ok=True)
    src, idx, lab = [], [], []
    for s in specs:
        x = source_from_spec(s)
        src += [s] * len(x)
        idx += list(range(len(x)))
        lab += x.labels.tolist()
    n = len(src)
    pq.write_table(pa.table({"source": pa.array(src, pa.string()), "index": pa.array(idx, pa.int64()),
                             "path": pa.array([""] * n, pa.string()), "label": pa.array(lab, pa.int64()),
                             "cluster": pa.array([-1] * n, pa.int64()), "query": pa.array([-1] * n, pa.int64()),
                             "similarity": pa.array([0.0] * n, pa.float32()),
                             "reason": pa.array(["raw pool"] * n, pa.string())}), str(out / "manifest.parquet"))


def measure(work: Path, curated: Path) -> dict:
    import pyarrow.parquet as pq
    specs = (work / "pool.txt").read_text().split()
    cifar, fmnist, planted, tcopies = specs
    orig = pq.read_table(str(work / "planted.parquet"), columns=["orig_index"]).column("orig_index").to_numpy()
    rm = pq.read_table(str(curated / "removed.parquet")).to_pydict()
    man = pq.read_table(str(curated / "manifest.parquet"), columns=["source"]).column("source").to_pylist()
    report = json.loads((curated / "report.json").read_text())
    src, reason = np.asarray(rm["source"], object), np.asarray(rm["reason"], object)
    of_src, of_idx, idx = np.asarray(rm["of_source"], object), np.asarray(rm["of_index"]), np.asarray(rm["index"])
    dup = reason == "duplicate"
    p_dup = dup & (src == planted)
    hit = int((p_dup & (of_src == cifar) & (of_idx == orig[np.where(p_dup, idx, 0)])).sum())
    n_tc = int(pq.ParquetFile(str(work / "testcopies.parquet")).metadata.num_rows)
    excl = int((src == tcopies).sum())
    in_domain = {cifar, planted, tcopies}
    n_pool = report["pool"]["embedded"]
    pool_in = sum(r["embedded"] for r in report["pool"]["sources"] if r["spec"] in in_domain)
    names = dict(zip(specs, ["cifar10_train", "fmnist32", "planted", "test_copies"], strict=True))
    res = {"dedup_threshold": report["dedup_threshold"], "rule": report["rule"], "clusters": report["clusters"],
           "planted": len(orig), "planted_removed_with_their_original": hit, "planted_recall": hit / len(orig),
           "removed_as_duplicate": int(dup.sum()), "removed_planted": int(p_dup.sum()),
           "duplicate_precision": int(p_dup.sum()) / max(int(dup.sum()), 1),
           "removed_as_duplicate_by_source": {names[k]: int((dup & (src == k)).sum()) for k in specs},
           "test_copies": n_tc, "test_copies_removed": excl, "test_copies_removed_share": excl / max(1, n_tc),
           "other_pool_images_excluded": int(((reason == "excluded") & (src != tcopies)).sum()),
           "pool_in_domain_share": pool_in / n_pool,
           "retrieved": len(man), "retrieved_in_domain_share": sum(s in in_domain for s in man) / max(1, len(man)),
           "retrieved_by_source": {names[k]: man.count(k) for k in specs}, "seconds": report["seconds"]}
    (curated / "curation.json").write_text(json.dumps(res, indent=2))
    rows = [("planted near-duplicates found (recall)", f"{hit}/{len(orig)} = {res['planted_recall']:.1%}"),
            ("images removed as duplicates that are planted (precision)",
             f"{res['removed_planted']}/{res['removed_as_duplicate']} = {res['duplicate_precision']:.1%}"),
            ("test-split copies removed", f"{excl}/{n_tc} = {res['test_copies_removed_share']:.1%}"),
            ("other pool images matching the test split", str(res["other_pool_images_excluded"])),
            ("in-domain share: pool -> retrieved",
             f"{res['pool_in_domain_share']:.1%} -> {res['retrieved_in_domain_share']:.1%} of {len(man)}")]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--work", default="runs/curation")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--duplicates", type=int, default=1000)
    b.add_argument("--test-copies", type=int, default=500)
    b.add_argument("--queries", type=int, default=1000)
    m = sub.add_parser("measure")
    m.add_argument("--work", default="runs/curation")
    m.add_argument("--curated", required=True)
    a = ap.parse_args()
    if a.cmd == "build":
        build(Path(a.work), a.seed, a.duplicates, a.test_copies, a.queries)
    else:
        measure(Path(a.work), Path(a.curated))


if __name__ == "__main__":
    main()
