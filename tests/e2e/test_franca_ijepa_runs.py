"""Franca and I-JEPA through the CLI: truncated k-NN in the loop == `fovea eval knn --widths`; under
torchrun 2 ranks (gloo, half the batch each) take the same steps as 1 process.

Checks the parts that must be global over ranks: per-level Sinkhorn-Knopp and the masked-patch count of
the nested iBOT heads (Franca), and the I-JEPA loss normalised by the global number of target patches
(each rank pads its own batch to its own longest mask, so the per-rank counts differ).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import JEPA_TINY, TINY, rows, run_cli, run_torchrun

FRANCA = ["method=franca", "dino.centering=sinkhorn", "ibot.enabled=true", "ibot.out_dim=32", "ibot.mask_prob=0.7",
          "ibot.mask_type=cyclic", "ibot.mask_ratio=[0.1,0.65]", "matryoshka.enabled=true",
          "matryoshka.widths=[12,24,48]", "model.layerscale_init=1e-5", "dino.use_bn=false", "koleo.weight=0"]


def folder_data(folder: Path) -> list[str]:
    return ["data.train.kind=folder", f"data.train.path={folder}", "data.eval_train=null", "data.eval_test=null"]


def test_franca_run_reports_truncated_knn_and_eval_command_agrees(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    data = [f"data.{split}.{key}" for split in ("train", "eval_train", "eval_test")
            for key in ("kind=folder", f"path={folder}")]
    proc = run_cli(["dino_vittiny_fmnist", *TINY, *FRANCA, *data, f"output_dir={out}", "data.batch_size=8",
                    "optim.max_steps=2", "eval.at_end=true", "eval.knn.ks=[5,10]", "eval.knn.widths=[12,24]"])
    for kind in ("cls", "cls@12", "cls@24"):
        assert f"k-NN end   ({kind}): k=5 " in proc.stdout, proc.stdout
    loop = json.loads((out / "results.json").read_text())["knn"]["end"]["features"]
    ev = subprocess.run([sys.executable, "-m", "fovea", "eval", "knn", str(out), "--widths", "1/4,1/2,1", "--k", "5",
                         "10", "--json", "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr
    got = json.loads(ev.stdout.strip().splitlines()[-1])["features"]
    assert set(got) == {"cls", "cls@12", "cls@24"}  # D/4 = 12, D/2 = 24, D = 48 is the plain kind
    for kind in got:
        for k in ("k=5", "k=10"):
            assert got[kind][k] == pytest.approx(loop[kind][k], abs=1e-4), (kind, k)


def test_franca_two_ranks_match_one_process(folder: Path, tmp_path: Path) -> None:
    common = ["dino_vittiny_fmnist", *TINY, *FRANCA, *folder_data(folder), "optim.max_steps=3",
              "train.checkpoint_every_steps=100"]
    run_cli(common + [f"output_dir={tmp_path / 'one'}", "data.batch_size=8"])
    run_torchrun(common + [f"output_dir={tmp_path / 'two'}", "data.batch_size=4"])
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    keys = [f"loss/{k}@{w}" for k in ("dino", "ibot") for w in (12, 24, 48)] + ["loss/total"]
    for s in one:
        for key in keys:
            assert two[s][key] == pytest.approx(one[s][key], abs=1e-4), (s, key)
    assert one[1]["loss/ibot@12"] > 0 and abs(one[3]["loss/total"] - one[1]["loss/total"]) > 1e-4


def test_ijepa_two_ranks_match_one_process(folder: Path, tmp_path: Path) -> None:
    common = ["ijepa_vittiny_cifar10", *JEPA_TINY, *folder_data(folder), "optim.max_steps=3",
              "train.checkpoint_every_steps=100", "eval.at_end=false"]
    run_cli(common + [f"output_dir={tmp_path / 'one'}", "data.batch_size=8"])
    run_torchrun(common + [f"output_dir={tmp_path / 'two'}", "data.batch_size=4"])
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        assert two[s]["loss/jepa"] == pytest.approx(one[s]["loss/jepa"], abs=1e-5), s
    assert abs(one[3]["loss/jepa"] - one[1]["loss/jepa"]) > 1e-4
