"""benchmarks/quality_curve.py end to end on a tiny run: k-NN at wall-clock marks (``eval.at_minutes``), the end
of training at the last mark (``train.max_minutes``), the raw-pixel baseline, the JSON and the plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO, TINY
from PIL import Image


def test_quality_curve_records_marks_raw_pixels_and_a_plot(folder: Path, tmp_path: Path) -> None:
    sets = [*(x for x in TINY if not x.startswith("eval.at_end")), "data.batch_size=8", "optim.max_steps=100000", "train.checkpoint_every_steps=100000",
            *(f"data.{s}.{k}" for s in ("train", "eval_train", "eval_test") for k in ("kind=folder", f"path={folder}"))]
    out = tmp_path / "qc"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality_curve.py"), "dino_vittiny_fmnist", "--minutes",
           "0.04,0.08", "--out", str(out), "--name", "tiny"] + [x for kv in sets for x in ("--set", kv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "quality_curve.json").read_text())
    run = data["runs"]["tiny"]
    tags = [p["tag"] for p in run["points"]]
    assert tags == ["start", "min0.04", "end"], tags  # the last mark, train.max_minutes, is the end evaluation
    mins = [p["minutes"] for p in run["points"]]
    assert mins[1] >= 0.04 and mins[2] >= 0.08 and mins == sorted(mins)
    steps = [p["step"] for p in run["points"]]
    assert 0 < steps[1] < steps[2] < 100000  # train.max_minutes ended the run, not the schedule
    assert run["ended_by"] == "train.max_minutes"
    assert all(0 <= p["knn"] <= 100 for p in run["points"])
    raw = data["raw_pixels"][run["dataset"]]
    assert raw["n_train"] == raw["n_test"] == 48 and raw["knn"] == 100.0  # the two classes are colour-coded
    assert Image.open(out / "quality_curve.png").size == (900, 560)
    assert Image.open(out / "quality_curve_images.png").size == (900, 560)
    assert [p["images"] for p in run["points"]] == [8 * s for s in steps]  # batch 8, one rank
    res = json.loads((out / "tiny" / "results.json").read_text())
    assert res["stopped"] == {"reason": "train.max_minutes", "step": res["steps"]}


def test_minutes_to_reach_reads_a_log_linear_trend() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality_curve import minutes_to_reach
    pts = [{"minutes": m, "knn": k} for m, k in [(0, 10.0), (2.5, 20.0), (5, 35.0), (10, 37.0), (20, 39.0)]]
    assert minutes_to_reach(pts, 41.0) == 40.0  # +2 points per doubling through the last 3: 41 at 40 minutes
    assert minutes_to_reach(pts, 43.0, last=3) == 80.0
    flat = [{"minutes": m, "knn": k} for m, k in [(0, 10.0), (5, 30.0), (10, 30.0), (20, 29.0)]]
    assert minutes_to_reach(flat, 41.0) is None and minutes_to_reach(pts[:2], 41.0) is None
