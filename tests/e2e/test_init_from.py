"""Continued pretraining (``train.init_from``): architecture and weights from an existing backbone, heads
when present, otherwise a head warm-up on the frozen backbone (teacher = student), then the backbone."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fovea.config.loader import load_config
from fovea.train.init_from import backbone_scale
from fovea.train.loop import Trainer
from helpers import TINY_RUN

TINY = [
    *TINY_RUN,
    "eval.at_start=false", "eval.at_end=false", "train.threads=1", "data.batch_size=8", "data.eval_train=null",
    "data.eval_test=null", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0", "dino.use_bn=false",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def trainer(images: Path, out: Path, *extra: str) -> Trainer:
    args = TINY + [f"output_dir={out}", "data.train.kind=folder", f"data.train.path={images}", *extra]
    return Trainer(load_config("dino_vittiny_fmnist", args))


def test_backbone_scale_schedule() -> None:
    assert [backbone_scale(s, 3, 4, 0.5) for s in range(8)] == [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5]
    assert backbone_scale(0, 0, 0, 0.1) == 0.1


def test_init_from_run_without_heads_warms_up_the_heads_first(images: Path, tmp_path: Path) -> None:
    src = trainer(images, tmp_path / "a", "optim.max_steps=2")
    src.fit()
    bb0 = {k: v.clone() for k, v in src.method.teacher.backbone.state_dict().items()}
    t = trainer(images, tmp_path / "b", "optim.max_steps=6", f"train.init_from={tmp_path / 'a' / 'backbone.safetensors'}",
                "optim.head_warmup_steps=3", "optim.backbone_lr_mult=0.5", "model.depth=4", "model.embed_dim=96")
    assert (t.cfg.model.depth, t.cfg.model.embed_dim) == (1, 48)  # architecture taken from the backbone
    assert t.results["init_from"] == {"backbone": "loaded", "dino_head": "absent"}
    for net in (t.method.student, t.method.teacher):
        assert all(torch.equal(v, bb0[k]) for k, v in net.backbone.state_dict().items())
    head0 = {k: v.clone() for k, v in t.method.student.head.state_dict().items()}
    t.plan.total_steps = 3  # stop after the head warm-up
    t.fit()
    s, te = t.method.student, t.method.teacher
    assert all(torch.equal(v, bb0[k]) for k, v in s.backbone.state_dict().items())  # backbone frozen
    assert not all(torch.equal(v, head0[k]) for k, v in s.head.state_dict().items())  # heads moved
    assert all(torch.equal(v, bb0[k]) for k, v in te.backbone.state_dict().items())  # teacher backbone too
    # the teacher's heads follow by EMA (optim.head_warmup_teacher=ema): moved, but not equal to the student's
    assert not all(torch.equal(v, head0[k]) for k, v in te.head.state_dict().items() if v.is_floating_point())
    assert not all(torch.equal(v, s.head.state_dict()[k]) for k, v in te.head.state_dict().items())
    # then the backbone trains
    t2 = trainer(images, tmp_path / "b", "optim.max_steps=6", f"train.init_from={tmp_path / 'a' / 'backbone.safetensors'}",
                 "optim.head_warmup_steps=3", "optim.backbone_lr_mult=0.5", "train.resume_force=true")
    assert t2.step == 3 and t2.results["init_from"]["dino_head"] == "absent"  # resumed, warm-up decision kept
    t2.fit()
    assert not all(torch.equal(v, bb0[k]) for k, v in t2.method.student.backbone.state_dict().items())


def test_init_from_run_folder_loads_its_heads(images: Path, tmp_path: Path) -> None:
    src = trainer(images, tmp_path / "a", "optim.max_steps=2")
    src.fit()
    t = trainer(images, tmp_path / "b", "optim.max_steps=2", f"train.init_from={tmp_path / 'a'}",
                "optim.head_warmup_steps=5")
    assert t.results["init_from"] == {"backbone": "loaded", "dino_head": "loaded"}
    assert t._head_warmup() == 0  # nothing fresh: no warm-up
    ref = src.method.teacher.head.state_dict()
    for net in (t.method.student, t.method.teacher):
        assert all(torch.equal(v, ref[k]) for k, v in net.head.state_dict().items())
    t.stop.restore()
    t.lock.release()
    # a head of another shape is not forced in: fresh, with the warm-up
    t3 = trainer(images, tmp_path / "c", "optim.max_steps=2", f"train.init_from={tmp_path / 'a'}", "dino.out_dim=64",
                 "optim.head_warmup_steps=5")
    assert t3.results["init_from"]["dino_head"] == "shape differs" and t3._head_warmup() == 5
    t3.stop.restore()
    t3.lock.release()


def test_init_from_bad_path_names_the_key(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.init_from"):
        trainer(images, tmp_path / "x", "train.init_from=/nonexistent/backbone.safetensors")
