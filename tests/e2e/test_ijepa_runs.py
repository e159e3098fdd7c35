"""I-JEPA through the one training loop: CLI run, exact resume, mean-patch k-NN and export."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import JEPA_TINY as TINY
from helpers import losses, run_cli

def jepa_losses(run: Path) -> dict[int, float]:
    return losses(run, "loss/jepa")


def args(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["ijepa_vittiny_cifar10", *TINY, f"output_dir={out}", "data.train.kind=folder",
            f"data.train.path={folder}", "data.eval_train.kind=folder", f"data.eval_train.path={folder}",
            "data.eval_test.kind=folder", f"data.eval_test.path={folder}", *extra]


def test_ijepa_trains_resumes_exactly_and_exports(folder: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    proc = run_cli(args(folder, a, "optim.max_steps=6", "train.checkpoint_every_steps=3",
                        "train.keep_checkpoints=2", "eval.knn.ks=[1]", "eval.knn.features=cls"))
    ref = jepa_losses(a)
    assert sorted(ref) == list(range(1, 7)) and len(set(ref.values())) == 6
    # eval.knn.features=cls on a backbone without CLS: evaluated (and reported) as mean_patch
    res = json.loads((a / "results.json").read_text())
    assert set(res["knn"]["end"]["features"]) == {"mean_patch"}
    assert res["knn"]["end"]["features"]["mean_patch"]["k=1"] == pytest.approx(100.0)  # bank == test set
    assert "k-NN end   (mean_patch)" in proc.stdout
    meta = yaml.safe_load((a / "backbone.yaml").read_text())
    assert meta["model"]["cls_token"] is False and meta["model"]["pos_embed"] == "sincos"
    assert meta["eval_features"] == "mean_patch"
    # resume from the step-3 checkpoint in a fresh folder: steps 4..6 repeat exactly (data, masks, RNG)
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copy(a / "checkpoints" / "step_00000003.pt", b / "checkpoints" / "last.pt")
    out = run_cli(args(folder, b, "optim.max_steps=6", "train.checkpoint_every_steps=3", "eval.at_end=false"))
    assert "at step 3/6" in out.stdout
    got = jepa_losses(b)
    assert sorted(got) == [4, 5, 6]
    for s in got:
        assert got[s] == pytest.approx(ref[s], abs=1e-6), (s, got[s], ref[s])
    # the exported backbone evaluates with the CLI's default --features cls -> mean_patch
    ev = subprocess.run([sys.executable, "-m", "fovea", "eval", "knn", str(a / "backbone.safetensors"), "--train",
                         f"folder:{folder}", "--test", f"folder:{folder}", "--k", "1", "--json", "--workers", "0"],
                        capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    r = json.loads(ev.stdout.strip().splitlines()[-1])
    assert set(r["features"]) == {"mean_patch"} and r["features"]["mean_patch"]["k=1"] == pytest.approx(100.0)
