"""Training from WebDataset tar shards (written by ``fovea data shard``): killed with SIGKILL mid-run and
resumed, the run logs the losses of an uninterrupted one."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, losses, run_cli, run_killed_at


def test_tar_shards_train_and_resume_exactly(folder: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fovea", "data", "shard", "--data", f"folder:{folder}", "--out",
                          str(tmp_path / "shards"), "--per-shard", "10"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train-{00000..00004}.tar" in out.stdout  # 48 images in 5 shards, the command says how to train
    common = ["dino_vittiny_fmnist", *TINY, "data.train.kind=webdataset",
              f"data.train.path={tmp_path / 'shards' / 'train-{00000..00004}.tar'}", "data.eval_train=null",
              "data.eval_test=null", "data.batch_size=8", "optim.max_steps=14", "train.checkpoint_every_steps=4"]
    run_cli(common + [f"output_dir={tmp_path / 'a'}"])
    ref = losses(tmp_path / "a")
    assert sorted(ref) == list(range(1, 15))
    b = tmp_path / "b"
    proc = run_killed_at(common + [f"output_dir={b}"], 10)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    again = run_cli(common + [f"output_dir={b}"])
    assert "at step 8/14" in again.stdout
    got = losses(b)
    assert sorted(got) == list(range(1, 15))
    for s in range(1, 15):
        assert got[s] == pytest.approx(ref[s], abs=1e-6), (s, got[s], ref[s])
