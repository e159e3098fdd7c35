"""FSDP2 (``train.strategy=fsdp``) under torchrun with 2 CPU ranks (gloo) against one process, and sharded
checkpoints (``torch.distributed.checkpoint``) resumed on another world size.

- Each of the dino, dinov2, franca and ijepa tiny set-ups takes the same steps on 2 FSDP ranks (half the
  batch each; for DINO also 2 accumulated micro-batches of a quarter) as one process with the whole batch:
  the same losses and, at the end, the same exported weights.
- A run of 2 FSDP ranks is resumed from its step-4 sharded checkpoint by one process with
  ``train.accumulate=2`` (the same global batch), whose sharded step-6 checkpoint is resumed on 2 ranks
  again, whose gathered full step-7 ``last.pt`` is resumed by one process: each continues the trajectory of
  the undisturbed run.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import JEPA_TINY, TINY, rows, run_cli, run_torchrun
from safetensors.torch import load_file

from test_dinov2_runs import V2
from test_franca_ijepa_runs import FRANCA

DATA = ["data.eval_train=null", "data.eval_test=null", "train.checkpoint_every_steps=100"]


def setup(name: str, folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(common arguments, one process's, the two FSDP ranks') and the logged keys compared."""
    data = ["data.train.kind=folder", f"data.train.path={folder}", *DATA]
    if name == "ijepa":
        return (["ijepa_vittiny_cifar10", *JEPA_TINY, *data, "optim.max_steps=3", "eval.at_end=false"],
                ["data.batch_size=8"], ["data.batch_size=4"])
    # head BatchNorm is per rank on gloo (SyncBatchNorm on CUDA only) and KoLeo per rank by definition: off
    parts = {"dino": ["dino.use_bn=false"], "dinov2": [*V2, "koleo.weight=0"], "franca": FRANCA}[name]
    two = ["data.batch_size=2", "train.accumulate=2"] if name == "dino" else ["data.batch_size=4"]
    return ["dino_vittiny_fmnist", *TINY, *parts, *data, "optim.max_steps=3"], ["data.batch_size=8"], two


KEYS = {"dino": ["loss/dino"], "dinov2": ["loss/dino", "loss/ibot", "loss/total"],
        "franca": [f"loss/{k}@{w}" for k in ("dino", "ibot") for w in (12, 24, 48)], "ijepa": ["loss/jepa"]}


def max_weight_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a / "backbone.safetensors")), load_file(str(b / "backbone.safetensors"))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.parametrize("name", ["dino", "dinov2", "franca", "ijepa"])
def test_fsdp_two_ranks_match_one_process(name: str, folder: Path, tmp_path: Path) -> None:
    common, one_args, two_args = setup(name, folder)
    run_cli(common + [f"output_dir={tmp_path / 'one'}", *one_args])
    run_torchrun(common + [f"output_dir={tmp_path / 'two'}", "train.strategy=fsdp", *two_args])
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for s in one:
        for key in KEYS[name]:
            assert two[s][key] == pytest.approx(one[s][key], abs=1e-5), (s, key)
        assert two[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-4), s  # norms over the shards
    key = KEYS[name][0]
    assert abs(one[3][key] - one[1][key]) > 1e-4  # the loss moves: equality says something
    assert max_weight_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    ckpt = tmp_path / "two" / "checkpoints" / "last.dcp"  # a sharded checkpoint: one file of shards per rank
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp_path / "two" / "checkpoints" / "last.pt").exists()


def _start_from(src: Path, dst: Path, ref: Path, step: int) -> None:
    """A run folder ``dst`` whose newest checkpoint is ``src`` (file or sharded folder) of step ``step``."""
    (dst / "checkpoints").mkdir(parents=True)
    target = dst / "checkpoints" / ("last.dcp" if src.is_dir() else "last.pt")
    shutil.copytree(src, target) if src.is_dir() else shutil.copy(src, target)
    lines = (ref / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x).get("step", 0) <= step))


def test_sharded_checkpoint_resumes_on_another_world_size(folder: Path, tmp_path: Path) -> None:
    common = ["dino_vittiny_fmnist", *TINY, "dino.use_bn=false", "data.train.kind=folder", f"data.train.path={folder}",
              "data.eval_train=null", "data.eval_test=null", "optim.max_steps=8"]
    a, b, c, d = (tmp_path / x for x in "abcd")
    # the undisturbed run: 2 FSDP ranks x 4 images, sharded checkpoints every 2 steps
    run_torchrun(common + [f"output_dir={a}", "data.batch_size=4", "train.strategy=fsdp",
                           "train.checkpoint_every_steps=2", "train.keep_checkpoints=4"])
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == [
        "last.dcp", "step_00000002.dcp", "step_00000004.dcp", "step_00000006.dcp"]
    ref = rows(a)
    # 2 ranks -> 1 process (2 x 4 accumulated), which writes sharded checkpoints itself
    _start_from(a / "checkpoints" / "step_00000004.dcp", b, a, 4)
    out = run_cli(common + [f"output_dir={b}", "data.batch_size=4", "train.accumulate=2",
                            "train.checkpoint_format=sharded", "train.checkpoint_every_steps=2"]).stdout
    assert "at step 4/8" in out and "written by 2 rank(s)" in out, out
    # 1 process -> 2 FSDP ranks, which write full checkpoints (gathered to rank 0)
    _start_from(b / "checkpoints" / "step_00000006.dcp", c, a, 6)
    out = run_torchrun(common + [f"output_dir={c}", "data.batch_size=4", "train.strategy=fsdp",
                                 "train.checkpoint_format=full", "train.checkpoint_every_steps=1"]).stdout
    assert "at step 6/8" in out, out
    # the gathered last.pt (its optimizer state keyed by parameter name) -> 1 process x 8 images
    _start_from(c / "checkpoints" / "step_00000007.pt", d, a, 7)
    out = run_cli(common + [f"output_dir={d}", "data.batch_size=8"]).stdout
    assert "at step 7/8" in out, out
    for run, first in ((b, 5), (c, 7), (d, 8)):
        got = rows(run)
        assert sorted(got) == list(range(1, 9))
        for s in range(first, 9):
            assert got[s]["loss/dino"] == pytest.approx(ref[s]["loss/dino"], abs=1e-5), (run.name, s)
        assert max_weight_diff(a, run) < 1e-5, run.name
    assert abs(ref[8]["loss/dino"] - ref[5]["loss/dino"]) > 1e-4
    # a sharded checkpoint is read whole by the evaluation side (no process group)
    from fovea.hub.backbone import load_backbone
    shutil.rmtree(a / "checkpoints" / "step_00000002.dcp")
    (a / "backbone.safetensors").rename(a / "exported.safetensors")
    model, _ = load_backbone(a)
    exported = load_file(str(a / "exported.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
