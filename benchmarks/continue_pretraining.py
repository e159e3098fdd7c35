"""Continued pretraining from a finished run's backbone, its heads thrown away: naive vs head warm-up.

    python benchmarks/continue_pretraining.py runs/dino_vittiny_cifar10 [--steps 500] [--every 50]

Both arms start from ``RUN/backbone.safetensors`` (no heads) with the run's own preset and data, and
report k-NN (k = 20, teacher CLS) every ``--every`` steps:
  (a) naive: fresh heads trained together with the backbone from step 0 at the preset's lr and momentum;
  (b) recipe (METHODS.md 5c): the heads first train alone on the frozen backbone (``--head-warmup`` steps,
      teacher = student), then the backbone joins, its lr rising linearly to ``--backbone-lr-mult`` x lr over
      ``--backbone-warmup`` steps; the teacher momentum is the run's unless ``--momentum`` / ``--momentum-end``.
The arms run side by side (one thread each). Prints a table and writes ``continue.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def arm_args(run: Path, out: Path, steps: int, every: int, recipe: bool, a: argparse.Namespace) -> list[str]:
    args = [str(run / "config.yaml"), f"output_dir={out}", f"optim.max_steps={steps}",
            f"train.init_from={run / 'backbone.safetensors'}", "eval.at_start=true", "train.threads=1",
            "train.progress=false", f"data.eval_train.limit={a.bank}", f"data.eval_test.limit={a.test}",
            "eval.knn.report=[cls]", f"eval.knn.ks=[{a.k}]", "eval.at_end=true", "train.resume=false", f"eval.every_steps={every}"]
    if recipe:
        args += [f"optim.head_warmup_steps={a.head_warmup}", f"optim.backbone_lr_mult={a.backbone_lr_mult}",
                 f"optim.backbone_warmup_steps={a.backbone_warmup if a.backbone_warmup >= 0 else a.head_warmup}"]
        if a.momentum > 0:
            args.append(f"optim.momentum_teacher={a.momentum}")
        if a.momentum_end > 0:
            args.append(f"optim.momentum_teacher_end={a.momentum_end}")
    return args


def curve(out: Path, k: str = "20") -> dict[int, float]:
    res = json.loads((out / "results.json").read_text())
    return {int(v["step"]): v["features"]["cls"][f"k={k}"] for v in res["knn"].values()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a finished run folder (config.yaml + backbone.safetensors)")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=50, help="k-NN every N steps")
    ap.add_argument("--head-warmup", type=int, default=100)
    ap.add_argument("--backbone-lr-mult", type=float, default=1.0, help="(b): backbone lr = lr x this after the warm-up")
    ap.add_argument("--backbone-warmup", type=int, default=-1, help="(b): steps of the backbone lr warm-up (-1: --head-warmup)")
    ap.add_argument("--momentum", type=float, default=0.0, help="(b): teacher momentum at the start (0: the run's)")
    ap.add_argument("--momentum-end", type=float, default=0.0, help="(b): teacher momentum at the end (0: the run's)")
    ap.add_argument("--arms", default="naive,recipe", help="arms to run; the others are read from --out (a previous run)")
    ap.add_argument("--bank", type=int, default=10000, help="k-NN bank images (a fixed random subset)")
    ap.add_argument("--test", type=int, default=10000, help="k-NN test images (a fixed random subset)")
    ap.add_argument("--k", type=int, default=20, help="k of the reported k-NN")
    ap.add_argument("--out", default="runs/continue")
    a = ap.parse_args()
    run, root = Path(a.run), Path(a.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, recipe in (("naive", False), ("recipe", True)):
        if name not in a.arms.split(","):
            continue
        cmd = [sys.executable, "-m", "fovea", "train", *arm_args(run, root / name, a.steps, a.every, recipe, a)]
        root.mkdir(parents=True, exist_ok=True)
        procs[name] = subprocess.Popen(cmd, env=env, stdout=open(root / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    for name, p in procs.items():
        if p.wait() != 0:
            print(f"[continue] {name} failed; see {root / (name + '.log')}")
            return 1
    curves = {name: curve(root / name, str(a.k)) for name in ("naive", "recipe")}
    steps = sorted(set().union(*curves.values()))
    print("| step | (a) naive: fresh heads + backbone from step 0 | (b) head warm-up recipe |")
    print("|---|---|---|")
    for s in steps:
        print(f"| {s} | {curves['naive'].get(s, float('nan')):.2f} | {curves['recipe'].get(s, float('nan')):.2f} |")
    start = curves["recipe"].get(0)
    worst = min(curves["recipe"].values())
    print(f"\n(b): start {start:.2f}, lowest {worst:.2f} ({worst - start:+.2f}), end {curves['recipe'][steps[-1]]:.2f}; "
          f"(a): lowest {min(curves['naive'].values()):.2f}, end {curves['naive'][steps[-1]]:.2f}")
    (root / "continue.json").write_text(json.dumps({"curves": curves, "args": vars(a), "recipe_args": arm_args(run, root / "recipe", a.steps, a.every, True, a)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
