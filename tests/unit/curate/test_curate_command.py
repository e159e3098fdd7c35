"""``fovea curate`` end to end on a small pool with known answers (exact copies planted within the pool and
from an evaluation set), the cache, the manifest source, and training on the manifest."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import TINY, run_cli

from fovea.hub.backbone import export_backbone
from fovea.models.vit import ViTConfig, VisionTransformer


def write_parquet(path: Path, images: list[np.ndarray], labels: list[int]) -> str:
    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()
    image = pa.StructArray.from_arrays([pa.array([png(a) for a in images], pa.binary()),
                                        pa.array([None] * len(images), pa.string())], names=["bytes", "path"])
    pq.write_table(pa.table({"image": image, "label": pa.array(labels, pa.int64())}), str(path), row_group_size=8)
    return f"parquet:{path}"


def curate_cli(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "fovea", "curate", *args, "--json"], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("curate")
    rng = np.random.default_rng(0)
    # 30 distinct images: a coloured shape on noise (labels 0/1/2 by colour channel)
    imgs = []
    for i in range(30):
        a = rng.integers(0, 120, (16, 16, 3), dtype=np.uint8)
        y, x = rng.integers(0, 8, 2)
        a[y:y + 8, x:x + 8, i % 3] = 255
        imgs.append(a)
    evals = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(6)]
    a_spec = write_parquet(root / "a.parquet", imgs, [i % 3 for i in range(30)])
    # pool part B: exact copies of A[0..4], then copies of eval images 0..2
    b_spec = write_parquet(root / "b.parquet", imgs[:5] + evals[:3], [i % 3 for i in range(5)] + [-1] * 3)
    e_spec = write_parquet(root / "eval.parquet", evals, [0] * 6)
    q_spec = write_parquet(root / "q.parquet", imgs[10:14], [i % 3 for i in range(10, 14)])
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(arch="vit_tiny", depth=1, embed_dim=48, num_heads=3, patch_size=4, img_size=16))
    export_backbone(vit, root / "model", extra={"crops": {"global_size": 16}})
    out = root / "out"
    args = ["--pool", a_spec, b_spec, "--queries", q_spec, "--exclude", e_spec, "--model", str(root / "model"),
            "--out", str(out), "--clusters", "4", "2", "--per-query", "3", "--dedup-threshold", "0.99999",
            "--workers", "0"]
    summary = curate_cli(args)
    return {"root": root, "out": out, "a": a_spec, "b": b_spec, "e": e_spec, "q": q_spec, "imgs": imgs,
            "args": args, "summary": summary}


def test_removed_images_are_exactly_the_planted_copies(pool: dict) -> None:
    s = pool["summary"]
    assert s["pool"]["images"] == 38 and s["pool"]["duplicates_removed"] == 5 and s["pool"]["excluded"] == 3
    assert s["pool"]["kept"] == 30 and s["clusters"] == [4, 2] and s["index"] == "flat"
    rm = pq.read_table(str(pool["out"] / "removed.parquet")).to_pydict()
    by_reason = {r: [(src, i, of_s, of_i) for src, i, rr, of_s, of_i in
                     zip(rm["source"], rm["index"], rm["reason"], rm["of_source"], rm["of_index"]) if rr == r]
                 for r in ("duplicate", "excluded")}
    assert sorted(by_reason["duplicate"]) == [(pool["b"], i, pool["a"], i) for i in range(5)]
    assert sorted(by_reason["excluded"]) == [(pool["b"], 5 + i, pool["e"], i) for i in range(3)]
    assert all(v > 0.99999 for v in rm["similarity"])


def test_manifest_rows_and_report(pool: dict) -> None:
    m = pq.read_table(str(pool["out"] / "manifest.parquet")).to_pydict()
    assert set(m) >= {"source", "index", "path", "label", "cluster", "cluster_1", "query", "similarity", "reason"}
    assert len(m["source"]) == pool["summary"]["retrieved"] and len(m["source"]) <= 12
    assert all(s == pool["a"] for s in m["source"])  # nothing removed comes back
    own = {(i, q) for i, q, s in zip(m["index"], m["query"], m["similarity"]) if s > 0.99999}
    assert own == {(10 + q, q) for q in range(4)}  # each query finds its own original first ...
    for i, q, r in zip(m["index"], m["query"], m["reason"]):
        if i == 10 + q:
            assert r == f"query {q} rank 1"  # ... as rank 1
    assert all(0 <= c < 4 for c in m["cluster"]) and all(0 <= c < 2 for c in m["cluster_1"])
    assert m["label"] == [i % 3 for i in m["index"]]
    report = (pool["out"] / "report.md").read_text()
    assert "| near-duplicates removed (5 groups) | 5 |" in report and "| copies of excluded sets removed | 3 |" in report
    png = Image.open(pool["out"] / "clusters.png")
    assert png.size[0] > 16 and png.size[1] > 16


def test_second_run_uses_the_cache(pool: dict) -> None:
    again = curate_cli(pool["args"])
    assert all(r["cached"] for r in again["pool"]["sources"])
    assert again["retrieved"] == pool["summary"]["retrieved"] and again["seconds"]["embed"] < 5


def test_manifest_source_reads_the_listed_images(pool: dict) -> None:
    from fovea.data.sources import SourceConfig, build_source
    src = build_source(SourceConfig(kind="manifest", path=str(pool["out"])))
    m = pq.read_table(str(pool["out"] / "manifest.parquet")).to_pydict()
    assert len(src) == len(m["index"]) and src.labels.tolist() == m["label"]
    for k, i in enumerate(m["index"]):
        assert np.array_equal(src.load(k), pool["imgs"][i])
    import pickle
    clone = pickle.loads(pickle.dumps(src))  # a data-loader worker opens its own sources
    assert np.array_equal(clone.load(0), src.load(0))
    with pytest.raises(FileNotFoundError, match="fovea curate"):
        build_source(SourceConfig(kind="manifest", path=str(pool["root"] / "nowhere")))


def test_train_on_the_manifest(pool: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_cli(["dino_vittiny_fmnist", *TINY, f"output_dir={run}", "data.train.kind=manifest",
             f"data.train.path={pool['out']}", "data.eval_train=null", "data.eval_test=null", "data.batch_size=4",
             "optim.epochs=1"])
    res = json.loads((run / "results.json").read_text())
    assert (run / "backbone.safetensors").exists() and res


def test_bad_arguments_are_named_before_any_work(pool: dict, tmp_path: Path) -> None:
    for extra, needle in ((["--pool", "parquet:/nowhere.parquet"], "/nowhere.parquet"),
                          (["--per-cluster", "3"], "not allowed with argument")):
        args = [a for a in pool["args"]]
        if extra[0] == "--pool":
            i = args.index("--pool")
            args[i + 1:i + 3] = [extra[1]]
        else:
            args += extra
        args[args.index("--out") + 1] = str(tmp_path / "o")
        proc = subprocess.run([sys.executable, "-m", "fovea", "curate", *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr
        assert not (tmp_path / "o" / "cache").exists()


def test_exclusion_has_its_own_threshold(pool: dict, tmp_path: Path) -> None:
    from fovea.curate.run import CurateOptions, curate
    base = dict(pool=[pool["a"], pool["b"]], queries=pool["q"], model=str(pool["root"] / "model"), exclude=[pool["e"]],
                dedup_threshold=0.99999, clusters=[2], per_query=1, cache=str(pool["out"] / "cache"), progress=False)
    strict = curate(CurateOptions(out=str(tmp_path / "strict"), **base))
    assert strict["pool"]["excluded"] == 3 and strict["exclude_threshold"] == 0.99999
    # a threshold near 0 calls every pool image a copy of some evaluation image, whatever the dedup threshold
    with pytest.raises(ValueError, match=r"38 as copies of --exclude images, 0 as near-duplicates"):
        curate(CurateOptions(out=str(tmp_path / "loose"), exclude_threshold=1e-6, **base))
    with pytest.raises(ValueError, match="--exclude-threshold"):
        curate(CurateOptions(out=str(tmp_path / "bad"), exclude_threshold=1.5, **base))


def test_a_separate_copy_detection_model(pool: dict, tmp_path: Path) -> None:
    """--dedup-model embeds pool and evaluation sets a second time for the copy-detection steps only."""
    from fovea.curate.run import CurateOptions, curate
    torch.manual_seed(7)
    other = VisionTransformer(ViTConfig(arch="vit_tiny", depth=1, embed_dim=24, num_heads=2, patch_size=8, img_size=16))
    export_backbone(other, tmp_path / "copy_model", extra={"crops": {"global_size": 16}})
    s = curate(CurateOptions(pool=[pool["a"], pool["b"]], queries=pool["q"], model=str(pool["root"] / "model"),
                             dedup_model=str(tmp_path / "copy_model"), exclude=[pool["e"]], out=str(tmp_path / "o"),
                             dedup_threshold=0.99999, clusters=[4], per_query=3, progress=False))
    assert s["dedup_model"] == str(tmp_path / "copy_model")
    assert s["pool"]["duplicates_removed"] == 5 and s["pool"]["excluded"] == 3  # exact copies under any model
    assert s["retrieved"] == pool["summary"]["retrieved"]  # retrieval still uses --model, on the same kept set
    cached = sorted(p.name for p in (tmp_path / "o" / "cache").glob("*.npy") if not p.name.endswith(".index.npy"))
    assert len(cached) == 2 + 1 + 1 + 2 + 1  # pool x2, queries, exclude by the model; pool x2, exclude by the other
    assert "copy detection with" in (tmp_path / "o" / "report.md").read_text()
