#!/usr/bin/env python
"""Quality per CPU-minute: k-NN of a preset, as shipped, at wall-clock marks of its training.

For every PRESET, runs ``fovea train PRESET`` with ``eval.at_minutes=MARKS`` (a k-NN, k = 20 on the preset's
full evaluation sets, each time the training time of the run, evaluations excluded, passes a mark) and
``train.max_minutes=max(MARKS)``; a preset whose schedule ends sooner contributes its end point. Records
(minutes, step, images/s, k-NN) per point, the raw-pixel k-NN of the same evaluation sets (mean-centred
pixels at the evaluation size, k = 20, T = 0.07) as the baseline, and writes ``OUT/quality_curve.json`` and
``OUT/quality_curve.png``. Results of earlier invocations in OUT are kept (one entry per run name).

Examples::

    python benchmarks/quality_curve.py dino_vittiny_fmnist --minutes 5,10
    python benchmarks/quality_curve.py dino_vittiny_cifar10 franca_vittiny_cifar10 --minutes 5,10,25
    python benchmarks/quality_curve.py dino_vittiny_cifar10 --minutes 25 --nproc 2 --name dino_2ranks
    python benchmarks/quality_curve.py dino_vittiny_cifar10 --minutes 25 --set model.patch_size=8 --name p8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def raw_pixel_knn(preset: str, overrides: list[str], k: int = 20, temperature: float = 0.07) -> dict[str, Any]:
    """k-NN top-1 (%) of mean-centred raw pixels on the preset's evaluation sets (its bank and test set)."""
    from fovea.config.loader import load_config
    from fovea.data.loader import EvalDataset, make_eval_loader
    from fovea.data.sources import build_source
    from fovea.eval.knn import knn_accuracy
    cfg = load_config(preset, overrides)
    if cfg.data.eval_train is None or cfg.data.eval_test is None:
        raise SystemExit(f"{preset}: no evaluation sets (data.eval_train / data.eval_test)")
    size = cfg.data.eval_size or cfg.crops.global_size

    def pixels(src_cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
        src = build_source(src_cfg)
        xs, ys = [], []
        for b in make_eval_loader(EvalDataset(src, size), 512, 0):
            xs.append(b["images"].flatten(1).float())
            ys.append(b["labels"])
        return torch.cat(xs), torch.cat(ys)

    t0 = time.time()
    (xtr, ytr), (xte, yte) = pixels(cfg.data.eval_train), pixels(cfg.data.eval_test)
    mean = xtr.mean(0, keepdim=True)
    acc = knn_accuracy(xtr - mean, ytr, xte - mean, yte, [k], temperature)[k]
    return {"knn": round(acc, 2), "n_train": len(ytr), "n_test": len(yte), "size": size,
            "seconds": round(time.time() - t0, 1)}


def train(preset: str, out: Path, marks: list[float], overrides: list[str], nproc: int) -> dict[str, Any]:
    args = [preset, f"output_dir={out}", "train.resume=false", f"eval.at_minutes=[{','.join(f'{m:g}' for m in marks)}]",
            f"train.max_minutes={max(marks):g}", "eval.at_start=true", "eval.at_end=true", "eval.knn.ks=[20]",
            *overrides]
    env = {**os.environ}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29633",
               "-m", "fovea", "train", *args, "train.threads=1"]
        env["OMP_NUM_THREADS"] = "1"
    else:
        cmd = [sys.executable, "-m", "fovea", "train", *args]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return collect(preset, out, overrides, nproc, time.time() - t0)


def collect(preset: str, out: Path, overrides: list[str], nproc: int, wall: float) -> dict[str, Any]:
    """The curve of a finished run folder ``out``."""
    res = json.loads((out / "results.json").read_text())
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    kind = cfg["eval"]["knn"]["features"]
    batch = int(cfg["data"]["batch_size"]) * max(nproc, 1) * int(cfg["train"]["accumulate"])  # global batch
    points = []
    for tag, r in res["knn"].items():
        feats = r["features"].get(kind) or r["features"].get("mean_patch")
        minutes = 0.0 if tag == "start" else r.get("train_minutes", res.get("train_minutes_without_eval"))
        if minutes is None:  # a run folder from before that key: wall minutes less the marks' evaluations
            marks = [v["seconds"] for t, v in res["knn"].items() if t.startswith(("min", "step"))]
            minutes = round(res["train_minutes_this_session"] - sum(marks) / 60, 3)
        points.append({"tag": tag, "minutes": minutes, "step": r["step"], "images": r["step"] * batch,
                       "knn": round(feats["k=20"], 2),
                       "images_per_s": r.get("images_per_s")})
    points.sort(key=lambda p: (p["minutes"], p["step"]))
    ends = res.get("stopped", {}).get("reason") or "end of the schedule"
    return {"preset": preset, "overrides": overrides, "nproc": nproc, "feature": kind, "points": points,
            "steps": res["steps"], "ended_by": ends, "wall_minutes": round(wall / 60, 2),
            "train_minutes": res.get("train_minutes_this_session")}


def minutes_to_reach(points: list[dict[str, Any]], target: float, last: int = 3) -> float | None:
    """Training minutes at which the curve would reach ``target``: a least-squares line of k-NN against
    ln(minutes) through the last ``last`` points after the start; None when the curve is not rising there. Only
    a reading of the trend (SSL curves bend down on longer schedules), not a prediction."""
    pts = [(math.log(p["minutes"]), p["knn"]) for p in points if p["minutes"] > 0][-last:]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx > 0 else 0.0
    if slope <= 0:
        return None
    return round(math.exp(mx + (target - my) / slope), 1)


def _fmt_minutes(m: float | None) -> str:
    return "not rising" if m is None else f"~{m:g} min" if m < 1e4 else "> 10^4 min"


def plot(results: dict[str, Any], raw: dict[str, Any], path: Path) -> None:
    """``path``: k-NN per training minute; ``path`` with ``_images``: the same points per training image seen
    (curves that coincide there differ only in images/s)."""
    from fovea.eval.chart import line_chart
    hlines = {f"raw pixels {ds}": b["knn"] for ds, b in raw.items()}
    series = {name: ([p["minutes"] for p in r["points"]], [p["knn"] for p in r["points"]]) for name, r in results.items()}
    line_chart(series, path, title="k-NN per training minute (2-core CPU)", xlabel="training minutes (evaluations excluded)",
               ylabel="k-NN top-1 (%), k = 20", hlines=hlines)
    series = {name: ([p["images"] / 1000 for p in r["points"]], [p["knn"] for p in r["points"]])
              for name, r in results.items() if all("images" in p for p in r["points"])}
    line_chart(series, path.with_name(path.stem + "_images" + path.suffix), title="k-NN per training image seen",
               xlabel="training images seen (thousands)", ylabel="k-NN top-1 (%), k = 20", hlines=hlines)


def dataset_of(preset: str, overrides: list[str]) -> str:
    from fovea.config.loader import load_config
    cfg = load_config(preset, overrides)
    t, b = cfg.data.eval_test, cfg.data.eval_train
    if t is None:
        return "none"
    bank = f" (bank {b.limit})" if b is not None and b.limit else ""  # raw pixels differ with the bank's size
    return f"{t.kind}:{Path(t.path).parent.name if t.path else t.split}{bank}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("presets", nargs="*", help="preset names or config files")
    ap.add_argument("--minutes", default="5,10,25,60", help="wall-clock marks of training, comma separated")
    ap.add_argument("--out", default="runs/quality_curve", help="folder of the runs, the JSON and the plot")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every preset (repeatable)")
    ap.add_argument("--nproc", type=int, default=1, help="torchrun ranks (CPU: 1 thread each)")
    ap.add_argument("--name", default="", help="entry name (default: the preset name)")
    ap.add_argument("--replot", action="store_true", help="re-read the stored runs' folders and redraw; no training")
    a = ap.parse_args(argv)
    if not a.presets and not a.replot:
        ap.error("give at least one preset (or --replot)")
    marks = sorted(float(m) for m in a.minutes.split(",") if m.strip())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "quality_curve.json"
    data = json.loads(store.read_text()) if store.exists() else {"runs": {}, "raw_pixels": {}}
    for name, r in list(data["runs"].items()) if a.replot else []:
        data["runs"][name] = {**r, **collect(r["preset"], out / name, r["overrides"], r["nproc"], r["wall_minutes"] * 60)}
    store.write_text(json.dumps(data, indent=2))
    for preset in [] if a.replot else a.presets:
        name = a.name or Path(preset).stem
        ds = dataset_of(preset, a.overrides)
        if ds not in data["raw_pixels"]:
            data["raw_pixels"][ds] = raw_pixel_knn(preset, a.overrides)
            print(f"raw pixels {ds}: {data['raw_pixels'][ds]}", flush=True)
        r = train(preset, out / name, marks, a.overrides, a.nproc)
        r["dataset"] = ds
        r["marks"] = marks
        data["runs"][name] = r
        store.write_text(json.dumps(data, indent=2))
    plot(data["runs"], data["raw_pixels"], out / "quality_curve.png")
    marks = sorted({m for r in data["runs"].values() for m in r["marks"]})  # the columns: every run's marks
    for r in data["runs"].values():
        raw_knn = data["raw_pixels"][r["dataset"]]["knn"]
        r["reached_raw_pixels"] = r["points"][-1]["knn"] >= raw_knn
        r["minutes_to_raw_pixels"] = None if r["reached_raw_pixels"] else minutes_to_reach(r["points"], raw_knn)
    store.write_text(json.dumps(data, indent=2))
    print(f"\n{'run':28s} {'dataset':30s} " + " ".join(f"{'min ' + format(m, 'g'):>8s}" for m in marks)
          + f" {'end':>14s} {'raw px':>7s} {'img/s':>7s} {'raw px at':>10s}")
    for name, r in data["runs"].items():
        by = {p["tag"]: p for p in r["points"]}
        end = by.get("end", r["points"][-1])
        if r["ended_by"] == "train.max_minutes":  # the last mark is the end evaluation (not run twice)
            by.setdefault(f"min{max(r['marks']):g}", end)
        cells = [f"{by[f'min{m:g}']['knn']:8.2f}" if f"min{m:g}" in by else f"{'-':>8s}" for m in marks]
        ips = [p["images_per_s"] for p in r["points"] if p.get("images_per_s")]
        print(f"{name:28s} {r['dataset']:30s} " + " ".join(cells) + f" {end['knn']:6.2f}@{end['minutes']:5.1f}m"
              f" {data['raw_pixels'][r['dataset']]['knn']:7.2f} {(ips[-1] if ips else float('nan')):7.1f}"
              f" {'reached' if r['reached_raw_pixels'] else _fmt_minutes(r['minutes_to_raw_pixels']):>10s}")
    print("(raw px at: training minutes where a line of k-NN against ln(minutes) through the last 3 points meets the"
          " raw pixels; a reading of the trend, not a prediction)")
    print(f"\nwrote {store}, {out / 'quality_curve.png'} and {out / 'quality_curve_images.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
