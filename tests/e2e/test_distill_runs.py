"""``fovea train`` with ``method: distill`` end to end: a tiny DINO run is the teacher, its heads give the
targets (``distill.target=heads``), the student's EMA is exported, and the run resumes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import TINY, base_args, losses, run_cli

STUDENT = ["model.embed_dim=24", "model.num_heads=2", "model.depth=1", "crops.n_local=0", "data.batch_size=8"]


def test_distil_a_run_with_its_heads(folder: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    run_cli(base_args(folder, teacher) + ["optim.epochs=1", "data.batch_size=8"])
    student = tmp_path / "student"
    args = ["distill_vittiny_cifar10", *TINY, *STUDENT, f"output_dir={student}", "data.train.kind=folder",
            f"data.train.path={folder}", "data.eval_train=null", "data.eval_test=null", f"distill.teacher={teacher}",
            "eval.at_start=false", "optim.epochs=1"]
    run_cli(args)
    got = losses(student, "loss/dino")
    assert len(got) == 6 and all(v > 0 for v in got.values())  # 48 images / 8 = 6 steps, the DINO term logged
    ckpt = torch.load(student / "checkpoints" / "last.pt", weights_only=True)
    teacher_ckpt = torch.load(teacher / "checkpoints" / "last.pt", weights_only=True)
    # the student's head has the teacher head's prototypes; the frozen teacher is not saved with the student
    assert ckpt["model"]["student.head.last_layer.weight_v"].shape[0] == \
        teacher_ckpt["model"]["teacher.head.last_layer.weight_v"].shape[0]
    assert not any(k.startswith("frozen") for k in ckpt["model"])
    assert ckpt["model"]["student.backbone.cls_token"].shape[-1] == 24
    meta = (student / "backbone.yaml").read_text()
    assert "embed_dim: 24" in meta  # the exported backbone is the student's (its EMA)
    # the same command resumes from last.pt (the teacher is read again): nothing is left to do
    proc = run_cli(args)
    assert "resum" in proc.stdout.lower()
    assert losses(student, "loss/dino") == got
    assert json.loads((student / "results.json").read_text())["steps"] == 6


def test_a_missing_teacher_is_named_before_any_work(folder: Path, tmp_path: Path) -> None:
    proc = run_cli(["distill_vittiny_cifar10", f"output_dir={tmp_path / 'run'}", f"distill.teacher={tmp_path / 'no'}",
                    "data.train.kind=folder", f"data.train.path={folder}", "data.eval_train=null",
                    "data.eval_test=null"], check=False)
    assert proc.returncode == 2 and "distill.teacher:" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()
