"""I-JEPA through the one training loop: CLI run, exact resume, mean-patch k-NN and export."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_e2e import make_folder, run_cli

TINY = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4", "model.img_size=16",
        "crops.global_size=16", "ijepa.pred_dim=24", "ijepa.pred_depth=2", "ijepa.pred_heads=3",
        "ijepa.min_context=4", "data.num_workers=0", "train.progress=false", "train.log_every_steps=1",
        "train.threads=1", "data.batch_size=8", "optim.warmup_epochs=0.5", "eval.at_start=false"]


def jepa_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss/jepa"] for r in rows if "loss/jepa" in r}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"))


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
