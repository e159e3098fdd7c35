#!/usr/bin/env python
"""First losses of the tiny presets on their real data: a refactor of the training step must not change them.

    python benchmarks/loss_trajectory.py --save benchmarks/results/loss_trajectory_ref.json   # before a change
    python benchmarks/loss_trajectory.py --check benchmarks/results/loss_trajectory_ref.json  # after it

Each preset trains ``--steps`` steps (1 thread, no workers, no evaluation, every step logged) through the real
``fovea train`` and the logged ``loss/*`` terms of every step are kept. ``--check`` prints the largest difference
per preset and exits 1 when any term differs by more than ``--tol`` (1e-6) or a term is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRESETS = ("dino_vittiny_cifar10", "dinov2_vittiny_cifar10", "franca_vittiny_cifar10", "ijepa_vittiny_cifar10")


def losses_of(preset: str, steps: int, extra: list[str]) -> dict[str, list[float]]:
    """{term: [loss at step 1..steps]} of ``preset`` trained ``steps`` steps in a temporary run folder."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "fovea", "train", preset, f"output_dir={tmp}/run", f"optim.max_steps={steps}",
                "train.log_every_steps=1", "eval.at_start=false", "eval.at_end=false", "train.threads=1",
                "data.num_workers=0", "train.progress=false", "train.resume=false", *extra]
        proc = subprocess.run(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{preset} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        rows = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if ln]
    rows = [r for r in rows if any(k.startswith("loss/") for k in r)]
    terms = sorted({k for r in rows for k in r if k.startswith("loss/")})
    return {t: [float(r.get(t, math.nan)) for r in rows] for t in terms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save", help="write the trajectories to this JSON file")
    ap.add_argument("--check", help="compare with the trajectories in this JSON file")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("overrides", nargs="*", help="extra KEY=VALUE overrides for every preset")
    a = ap.parse_args()
    got = {p: losses_of(p, a.steps, a.overrides) for p in a.presets}
    if a.save:
        Path(a.save).parent.mkdir(parents=True, exist_ok=True)
        Path(a.save).write_text(json.dumps({"steps": a.steps, "losses": got}, indent=1))
        print(f"wrote {a.save}")
    if not a.check:
        for p, terms in got.items():
            print(f"{p}: " + ", ".join(f"{t} {v[0]:.6f} -> {v[-1]:.6f}" for t, v in terms.items()))
        return 0
    ref = json.loads(Path(a.check).read_text())["losses"]
    ok = True
    print("| preset | terms | steps | max abs diff |\n|---|---|---|---|")
    for p, terms in got.items():
        want = ref.get(p, {})
        missing = sorted(set(want) ^ set(terms))
        diffs = [abs(x - y) for t in terms if t in want for x, y in zip(terms[t], want[t], strict=True)]
        worst = max(diffs) if diffs else math.inf
        ok &= not missing and worst <= a.tol
        print(f"| {p} | {len(terms)} | {len(next(iter(terms.values())))} | {worst:.3g}"
              + (f" (terms only on one side: {missing})" if missing else "") + " |")
    print("PASS" if ok else f"FAIL (tolerance {a.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
