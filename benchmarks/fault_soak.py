"""Fault soak: kill a short CPU training run at random moments, resume it each time, and check that it
ends bit-identical to an uninterrupted run.

    python benchmarks/fault_soak.py                      # 20 SIGKILLs, then 20 SIGTERMs
    python benchmarks/fault_soak.py --signals KILL --kills 5 --out /tmp/soak

For each signal: one reference run without interruption; then the same command is started, killed
with the signal after a uniform random delay in [0, reference wall time] (start-up, steps, checkpoint
writes and the final export are all hit), restarted, ... ``--kills`` times, and finally run to the end.
Compared with the reference: every tensor of the final ``last.pt`` (model and optimizer state), the
bytes of ``backbone.safetensors`` and the logged loss of every step. Prints a table and writes
``soak.json`` in ``--out``. Marked as a benchmark: it takes a few minutes, not part of the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY = [
    "dino_vittiny_fmnist", "model.arch=vit_tiny", "model.depth=2", "model.embed_dim=48", "model.num_heads=3",
    "model.patch_size=4", "model.img_size=16", "crops.global_size=16", "crops.local_size=8", "crops.n_local=2",
    "dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16", "train.progress=false",
    "train.log_every_steps=1", "eval.at_start=false", "eval.at_end=false", "train.threads=1",
    "data.eval_train=null", "data.eval_test=null", "data.batch_size=8", "train.checkpoint_every_steps=5",
]


def make_images(root: Path, n: int = 48) -> Path:
    """``n`` random 24x24 PNGs in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        arr[..., i % 2] = 255
        Image.fromarray(arr).save(d / f"{i:03d}.png")
    return root


def command(data: Path, out: Path, steps: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "fovea", "train", *TINY, f"optim.max_steps={steps}", f"data.num_workers={workers}",
            "data.train.kind=folder", f"data.train.path={data}", f"output_dir={out}"]


def run(cmd: list[str], kill_after: float | None = None, sig: int = signal.SIGKILL) -> tuple[int, float, str]:
    """Run ``cmd`` (its own process group, as a terminal or a batch system starts it); with ``kill_after``
    send ``sig`` to the whole group after that many seconds. Returns (exit code, seconds, stderr tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    if kill_after is None:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"run failed ({p.returncode}): {err[-2000:]}")
        return p.returncode, time.time() - t0, err[-500:]
    try:
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, sig)
    _, err = p.communicate()
    return p.returncode, time.time() - t0, err[-500:]


def checkpoint_step(out: Path) -> int:
    try:
        return int(torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - none yet, or the kill hit before any checkpoint
        return -1


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def flat_tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat_tensors(v, f"{prefix}/{i}"))
    return out


def compare(ref: Path, got: Path) -> dict:
    a = torch.load(ref / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(got / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    ta, tb = flat_tensors({"model": a["model"], "optimizer": a["optimizer"]["state"]}), \
        flat_tensors({"model": b["model"], "optimizer": b["optimizer"]["state"]})
    differ = [k for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
    la, lb = losses(ref), losses(got)
    return {"tensors": len(ta), "tensors_differing": len(differ) + len(set(tb) - set(ta)),
            "first_differing": differ[:5], "steps": (int(a["step"]), int(b["step"])),
            "backbone_bytes_equal": (ref / "backbone.safetensors").read_bytes() == (got / "backbone.safetensors").read_bytes(),
            "losses_equal": la == lb, "logged_steps": len(lb)}


def soak(sig_name: str, kills: int, steps: int, workers: int, root: Path, data: Path, rnd: random.Random) -> dict:
    sig = getattr(signal, f"SIG{sig_name}")
    ref, got = root / f"ref_{sig_name}", root / f"soak_{sig_name}"
    _, t_ref, _ = run(command(data, ref, steps, workers))
    _, t_idle, _ = run(command(data, ref, steps, workers))  # a finished run again: start-up + export only
    events = []
    for i in range(kills):
        # a moment within start-up plus at most a twentieth of the run's steps: every kill can land in
        # start-up, a step, a checkpoint write, and the run is still unfinished after all the kills
        left = min(max(steps - max(checkpoint_step(got), 0), 1), max(steps // 20, 1))
        delay = rnd.uniform(0, t_idle + (t_ref - t_idle) * left / steps)
        before = checkpoint_step(got)
        code, secs, err = run(command(data, got, steps, workers), kill_after=delay, sig=sig)
        events.append({"kill": i + 1, "signal": sig_name, "after_s": round(delay, 2), "exit": code,
                       "ckpt_step_before": before, "ckpt_step_after": checkpoint_step(got),
                       "lock_left": (got / "run.lock").exists(), "stderr_tail": err})
        print(f"  {sig_name} #{i + 1:2d} at {delay:5.2f}s: exit {code:4d}, checkpoint step {before:4d} -> "
              f"{events[-1]['ckpt_step_after']:4d}", flush=True)
    run(command(data, got, steps, workers))
    res = compare(ref, got)
    res.update({"signal": sig_name, "reference_seconds": round(t_ref, 1), "startup_seconds": round(t_idle, 1),
                "events": events})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--signals", default="KILL,TERM", help="comma list of KILL, TERM, INT")
    ap.add_argument("--kills", type=int, default=20, help="interruptions per signal")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of the run")
    ap.add_argument("--workers", type=int, default=1, help="data.num_workers")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--out", default="runs/fault_soak", help="work folder (soak.json is written here)")
    a = ap.parse_args()
    root = Path(a.out)
    if root.exists():
        import shutil
        shutil.rmtree(root)
    data = make_images(root / "images")
    rnd = random.Random(a.seed)
    results = []
    for s in a.signals.split(","):
        print(f"[soak] {s.strip()}: reference run, then {a.kills} interruptions", flush=True)
        results.append(soak(s.strip().upper(), a.kills, a.steps, a.workers, root, data, rnd))
    print("\n| signal | kills | kills after the run had advanced | exit codes | final step | tensors equal | backbone bytes equal "
          "| losses equal |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for r in results:
        codes = sorted({e["exit"] for e in r["events"]})
        same = r["tensors_differing"] == 0
        expected = {0, -9} if r["signal"] == "KILL" else {0, 128 + getattr(signal, "SIG" + r["signal"]),
                                                            -getattr(signal, "SIG" + r["signal"])}
        odd = [e for e in r["events"] if e["exit"] not in expected]
        for e in odd:
            print(f"[soak] unexpected exit {e['exit']} at kill #{e['kill']}: {e['stderr_tail']}")
        ok &= same and r["backbone_bytes_equal"] and r["losses_equal"] and not odd
        hit = sum(e["exit"] == 143 or e["ckpt_step_after"] > e["ckpt_step_before"] for e in r["events"])
        print(f"| SIG{r['signal']} | {len(r['events'])} | {hit} | {codes} | {r['steps'][1]}/{r['steps'][0]} | "
              f"{r['tensors'] - r['tensors_differing']}/{r['tensors']} | {r['backbone_bytes_equal']} | {r['losses_equal']} |")
    (root / "soak.json").write_text(json.dumps(results, indent=2))
    print(f"\n[soak] {'PASS' if ok else 'FAIL'}: bit-identical to the uninterrupted run; details in {root / 'soak.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
