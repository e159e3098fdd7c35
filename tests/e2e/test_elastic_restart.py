"""Elastic restart: under ``torchrun --max-restarts=1`` a rank killed mid-run (SIGKILL) makes torchrun
restart both ranks, the same command resumes from the last checkpoint, and the run ends with the weights of
an undisturbed run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import base_args, free_port


def _torchrun(args: list[str], restarts: int, log: Path) -> subprocess.Popen:
    """torchrun in the background, its output to ``log`` (a pipe nobody reads would fill and stall it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", f"--rdzv_id=test{restarts}", f"--max-restarts={restarts}",
           "-m", "fovea", "train", *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` among the descendants of ``parent`` (its RANK environment variable)."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"fovea" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        deeper = _rank_pid(pid, rank)
        if deeper:
            return deeper
    return None


@pytest.mark.slow  # two 2-rank runs; torchrun restarts (run with -m slow)
def test_a_killed_rank_restarts_and_ends_on_the_same_weights(folder: Path, tmp_path: Path) -> None:
    steps = ["optim.max_steps=36", "train.checkpoint_every_steps=4", "train.threads=1", "dino.use_bn=false",
             "data.batch_size=4", "optim.epochs=100"]
    calm = _torchrun(base_args(folder, tmp_path / "calm") + steps, restarts=0, log=tmp_path / "calm.log")
    assert calm.wait(timeout=600) == 0, (tmp_path / "calm.log").read_text()
    run = tmp_path / "hit"
    proc = _torchrun(base_args(folder, run) + steps, restarts=1, log=tmp_path / "hit.log")
    killed = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if not killed and (run / "checkpoints" / "step_00000008.pt").exists():
            pid = _rank_pid(proc.pid, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    proc.wait(timeout=300)
    out = (tmp_path / "hit.log").read_text()
    assert killed, "the run ended before a rank could be killed: make it longer"
    assert proc.returncode == 0, out
    assert "resumed from" in out  # the restarted ranks continued from last.pt
    a, b = load_file(str(tmp_path / "calm" / "backbone.safetensors")), load_file(str(run / "backbone.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
