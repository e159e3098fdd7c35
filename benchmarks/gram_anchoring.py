#!/usr/bin/env python
"""What Gram anchoring does to patch features: the same run with and without it, same steps (CIFAR-10).

    python benchmarks/gram_anchoring.py [--preset dinov3_vittiny_cifar10] [--out runs/gram]

Both arms train the preset (``gram.enabled=true`` and ``false``; identical until ``gram.start``) side by side,
one thread each, then are scored on
  - k-NN (k = 20) of the CLS and of the mean patch token on the CIFAR-10 test split (full 50k bank);
  - a labelled patch task built from CIFAR-10: 64-px scenes of 2 x 2 CIFAR images, each pixel labelled with
    its image's class. HummingBird in-context segmentation (memory from the scenes of training images,
    mIoU on scenes of test images) and linear segmentation, through ``fovea eval seg``.
Prints a table and writes ``gram.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np


def make_scenes(out: Path, split: str, n: int, seed: int) -> Path:
    """``n`` 64-px scenes of 4 CIFAR-10 images of ``split`` (drawn without replacement), masks = class ids."""
    from PIL import Image

    from fovea.data.sources import SourceConfig, build_source
    root = out / f"scenes_{split}"
    if (root / "masks").exists() and len(list((root / "masks").glob("*.png"))) == n:
        return root
    src = build_source(SourceConfig(kind="parquet", path=f"$FOVEA_DATA/cifar10/{split}.parquet"))
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(src))[:4 * n]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for s in range(n):
        img = np.zeros((64, 64, 3), np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        for q in range(4):
            i = int(idx[4 * s + q])
            y, x = 32 * (q // 2), 32 * (q % 2)
            img[y:y + 32, x:x + 32] = src.load(i)
            mask[y:y + 32, x:x + 32] = int(src.labels[i])
        Image.fromarray(img).save(root / "images" / f"{s:05d}.png")
        Image.fromarray(mask).save(root / "masks" / f"{s:05d}.png")
    return root


def train_args(preset: str, out: Path, gram: bool, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "fovea", "train", preset, f"output_dir={out}", f"gram.enabled={str(gram).lower()}",
            "train.threads=1", "train.progress=false", "train.resume=false", "eval.at_start=false",
            "eval.knn.report=[cls,mean_patch]", "eval.knn.ks=[20]", *extra]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dinov3_vittiny_cifar10")
    ap.add_argument("--out", default="runs/gram")
    ap.add_argument("--train-scenes", type=int, default=1000, help="scenes of training images (HummingBird memory)")
    ap.add_argument("--test-scenes", type=int, default=500, help="scenes of test images (scored)")
    ap.add_argument("--skip-train", action="store_true", help="only evaluate the runs already in --out")
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides for both arms")
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    seg_train, seg_test = make_scenes(root, "train", a.train_scenes, 0), make_scenes(root, "test", a.test_scenes, 1)
    arms = {"with Gram": root / "with_gram", "without": root / "without"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not a.skip_train:
        procs = {name: subprocess.Popen(train_args(a.preset, d, name == "with Gram", a.overrides), env=env,
                                        stdout=open(f"{d}.log", "w"), stderr=subprocess.STDOUT)
                 for name, d in arms.items()}
        for name, p in procs.items():
            if p.wait() != 0:
                print(f"[gram] {name} failed; see {arms[name]}.log")
                return 1
    rows = {}
    for name, d in arms.items():
        res = json.loads((d / "results.json").read_text())
        knn = res["knn"]["end"]["features"]
        seg = subprocess.run([sys.executable, "-m", "fovea", "eval", "seg", str(d), "--seg-train", str(seg_train),
                              "--seg-test", str(seg_test), "--size", "64", "--num-classes", "10", "--json",
                              "--no-cache", "--out", str(d / "eval_scenes")], env={**os.environ, "OMP_NUM_THREADS": "2"},
                             capture_output=True, text=True)
        if seg.returncode != 0:
            print(seg.stdout[-2000:], seg.stderr[-2000:])
            return 1
        s = json.loads(seg.stdout.strip().splitlines()[-1])
        rows[name] = {"steps": res["steps"], "knn_cls": knn["cls"]["k=20"], "knn_mean_patch": knn["mean_patch"]["k=20"],
                      "seg": s}
    print("| arm | steps | k-NN CLS | k-NN mean patch | HummingBird mIoU | linear seg mIoU |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        seg = r["seg"].get("seg", r["seg"])
        hb = seg.get("hummingbird", {}).get("miou", float("nan"))
        lin = seg.get("linear", {}).get("miou", float("nan"))
        print(f"| {name} | {r['steps']} | {r['knn_cls']:.2f} | {r['knn_mean_patch']:.2f} | {hb:.2f} | {lin:.2f} |")
    (root / "gram.json").write_text(json.dumps({"arms": rows, "args": vars(a)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
