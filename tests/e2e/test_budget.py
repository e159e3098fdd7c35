"""``train.budget_minutes``: a run sized to a time budget by a speed probe, which leaves no trace: the run equals
the one ``optim.max_steps`` (the length the probe chose) gives, and a resume keeps that length."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fovea.errors import ConfigError
from fovea.train.budget import budget_steps
from helpers import TINY_RUN, make_folder

TINY = [*TINY_RUN, "train.log_every_steps=1", "eval.at_start=false", "eval.at_end=false", "train.threads=1",
        "data.batch_size=8", "data.eval_train=null", "data.eval_test=null", "train.checkpoint_every_steps=1000"]


def cli(out: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = ["dino_vittiny_fmnist", *TINY, f"output_dir={out}", "data.train.kind=folder", f"data.train.path={data}",
            *extra]
    return subprocess.run([sys.executable, "-m", "fovea", "train", *argv], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_budget_steps_fill_what_the_probe_leaves() -> None:
    assert budget_steps(1.0, 12.0, 100.0, 8) == 600  # (60 - 12) s x 100 img/s / 8 per step
    assert budget_steps(0.5, 0.0, 10.0, 64) == 4  # 300 images: 4.69 steps of 64, rounded down
    assert budget_steps(0.01, 0.5, 1.0, 128) == 1  # never under one step
    with pytest.raises(ConfigError, match="used up by the speed probe"):
        budget_steps(0.1, 6.0, 100.0, 8)


def test_budget_run_equals_the_max_steps_run_and_resumes_with_its_length(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "imgs", n_per_class=16)
    a = tmp_path / "budget"
    proc = cli(a, data, "train.budget_minutes=0.12", "train.budget_probe_steps=6")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = yaml.safe_load((a / "config.yaml").read_text())["optim"]["max_steps"]
    assert isinstance(steps, int) and steps > 0
    assert f"-> optim.max_steps={steps} (" in proc.stdout and "over 6 timed steps" in proc.stdout
    assert not (a / "budget_probe").exists()
    # the probe leaves no trace: the same run of that length, without a probe, gives the same weights
    b = tmp_path / "fixed"
    ref = cli(b, data, f"optim.max_steps={steps}")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    wa, wb = load_file(a / "backbone.safetensors"), load_file(b / "backbone.safetensors")
    assert wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)
    # the same command again resumes with the length its first session chose, without a new probe
    again = cli(a, data, "train.budget_minutes=0.12", "train.budget_probe_steps=6")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"keeps its optim.max_steps={steps}" in again.stdout and "timed steps" not in again.stdout
    assert f"at step {steps}/{steps}" in again.stdout


def test_budget_and_max_steps_together_are_refused(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "imgs", n_per_class=4)
    proc = cli(tmp_path / "run", data, "train.budget_minutes=1", "optim.max_steps=5")
    assert proc.returncode != 0
    assert "train.budget_minutes=1 and optim.max_steps=5 both set the run's length" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
