"""The run folder under faults a user meets: bad data keys, a failing final evaluation, two runs in one
folder, a changed config on resume, SIGTERM / SIGINT, damaged or malicious checkpoints, a wrong device,
a non-finite loss, file modes (issue 13, items 6-15)."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fovea.config.loader import load_config
from fovea.errors import ConfigError
from fovea.core.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, save_atomic
from fovea.core.distributed import check_device
from fovea.train.runfolder import RunFolderBusy, RunLock, load_resume_checkpoint, trajectory_diff
from helpers import TINY_RUN

TINY = [
    *TINY_RUN,
    "train.log_every_steps=1", "eval.at_start=false", "eval.at_end=true", "train.threads=1",
    "data.batch_size=8", "eval.knn.ks=[3]",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(32):
        d = root / "ab"[i % 2]
        d.mkdir(exist_ok=True)
        arr = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        arr[..., i % 2] = 255
        Image.fromarray(arr).save(d / f"{i:02d}.png")
    return root


def args(images: Path, out: Path, *extra: str) -> list[str]:
    return ["dino_vittiny_fmnist", *TINY, f"output_dir={out}", "data.train.kind=folder", f"data.train.path={images}",
            "data.eval_train.kind=folder", f"data.eval_train.path={images}", "data.eval_test.kind=folder",
            f"data.eval_test.path={images}", *extra]


def cli(argv: list[str], code: str = "") -> subprocess.CompletedProcess:
    """``fovea train ARGV`` in a fresh interpreter; ``code`` runs first (e.g. a patch of the loop)."""
    prog = textwrap.dedent(code) + f"\nimport sys\nfrom fovea.cli import main\nsys.exit(main(['train', *{argv!r}]))\n"
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def trainer(images: Path, out: Path, *extra: str):  # noqa: ANN201 - a Trainer
    from fovea.train.loop import Trainer
    return Trainer(load_config(args(images, out, *extra)[0], args(images, out, *extra)[1:]))


def total_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


# --------------------------------------------------------------------------- 6: sources probed first

@pytest.mark.parametrize("key,bad", [("data.eval_test", "data.eval_test.path=/nonexistent/x"),
                                     ("data.eval_train", "data.eval_train.kind=tarball"),
                                     ("data.train", "data.train.path=/nonexistent/y")])
def test_bad_data_source_stops_before_any_work_naming_the_key(images: Path, tmp_path: Path, key: str,
                                                              bad: str) -> None:
    out = tmp_path / "run"
    proc = cli(args(images, out, "optim.max_steps=2", bad))
    assert proc.returncode == 2, proc.stderr
    # a bad path is found when the sources are probed, a bad kind already by the config loader (a typed choice)
    one = proc.stderr.strip()
    assert (one.startswith(f"fovea: error: {key}:") or one.startswith(f"fovea: config error: {key}.")) \
        and len(one.splitlines()) == 1, one
    assert not out.exists()  # nothing was written


def test_eval_sources_must_come_in_labelled_pairs(images: Path, tmp_path: Path) -> None:
    from fovea.train.runfolder import open_run_sources
    cfg = load_config(args(images, tmp_path)[0], args(images, tmp_path)[1:] + ["data.eval_test=null"])
    with pytest.raises(ValueError, match="data.eval_train is set but data.eval_test is not"):
        open_run_sources(cfg)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / f"{i}.png")
    cfg = load_config(args(images, tmp_path)[0], args(images, tmp_path)[1:] + [f"data.eval_test.path={flat}"])
    with pytest.raises(ValueError, match="data.eval_test: .* has no labels"):
        open_run_sources(cfg)
    cfg = load_config(args(images, tmp_path)[0], args(images, tmp_path)[1:] + [
        "data.eval_test=null", "data.eval_train=null", "eval.final=[knn]"])
    with pytest.raises(ValueError, match="eval.final=.* needs labelled splits"):
        open_run_sources(cfg)
    # no evaluation at all: unlabelled or missing eval splits are not read
    cfg = load_config(args(images, tmp_path)[0], args(images, tmp_path)[1:] + [f"data.eval_test.path={flat}"])
    cfg.eval.at_end = False
    assert list(open_run_sources(cfg)) == ["data.train"]


# --------------------------------------------------------------------------- 7: model saved before evaluation

def test_failing_final_evaluation_keeps_the_trained_model(images: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fovea.train.loop as loop

    def broken(*a: object, **k: object) -> dict:
        raise RuntimeError("evaluation data vanished")

    monkeypatch.setattr(loop, "evaluate_knn_sharded", broken)
    t = trainer(images, tmp_path, "optim.max_steps=3", "eval.at_end=true")
    with pytest.raises(RuntimeError, match="vanished"):
        t.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3
    from fovea.hub.backbone import load_backbone
    bb, _ = load_backbone(tmp_path / "backbone.safetensors")
    ref = t.method.eval_backbone().state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in bb.state_dict().items())
    assert not (tmp_path / "run.lock").exists()  # released although the run failed


# --------------------------------------------------------------------------- 8: one run per folder

def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lock = RunLock(tmp_path)
    lock.acquire()
    info = json.loads((tmp_path / "run.lock").read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "start" in info
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    # a live process on this host (our parent) holds it: refused, lock untouched
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": "x"}))
    with pytest.raises(RunFolderBusy, match=f"pid {os.getppid()} on this host"):
        RunLock(tmp_path).acquire()
    # a process on another host: cannot be checked from here, refused
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 123, "host": "node-17", "start": "x"}))
    with pytest.raises(RunFolderBusy, match="node-17"):
        RunLock(tmp_path).acquire()
    # a dead process (a finished child's pid) on this host: taken over with a warning
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": "x"}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert "taking over the lock" in capsys.readouterr().err
    lock.release()


def test_second_run_into_a_busy_folder_is_refused(images: Path, tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "start": "2026-12-01T10:00:00"}))
    proc = cli(args(images, tmp_path, "optim.max_steps=2"))
    assert proc.returncode == 2
    assert "is in use by another run" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- 9: resume checks

def test_trajectory_diff_lists_only_keys_that_change_training() -> None:
    a = {"optim": {"lr": 1.0, "epochs": 2}, "eval": {"at_end": True}, "train": {"progress": True, "seed": 0},
         "data": {"batch_size": 8, "num_workers": 2, "eval_test": {"path": "a"}}}
    b = {"optim": {"lr": 2.0, "epochs": 2}, "eval": {"at_end": False}, "train": {"progress": False, "seed": 0},
         "data": {"batch_size": 16, "num_workers": 0, "eval_test": {"path": "b"}}}
    assert trajectory_diff(a, b, 1, 1) == ["data.batch_size: 8 -> 16", "optim.lr: 1.0 -> 2.0"]
    assert trajectory_diff(a, a, 2, 1) == ["world size (ranks): 2 -> 1"]
    assert trajectory_diff(a, a, None, 4) == []


def test_resume_with_changed_trajectory_keys_is_refused_then_forced(images: Path, tmp_path: Path) -> None:
    first = cli(args(images, tmp_path, "optim.max_steps=2"))
    assert first.returncode == 0, first.stderr
    written = (tmp_path / "config.yaml").read_text()
    proc = cli(args(images, tmp_path, "optim.max_steps=4", "data.batch_size=16", "optim.lr=2e-3"))
    assert proc.returncode == 2
    assert "optim.max_steps: 2 -> 4" in proc.stderr and "data.batch_size: 8 -> 16" in proc.stderr
    assert "optim.lr: 0.001 -> 0.002" in proc.stderr and "train.resume_force=true" in proc.stderr
    assert (tmp_path / "config.yaml").read_text() == written  # not rewritten before the check
    # evaluation / logging keys may change freely
    ok = cli(args(images, tmp_path, "optim.max_steps=2", "train.log_every_steps=5", "eval.knn.ks=[2]"))
    assert ok.returncode == 0 and "resumed from" in ok.stdout
    forced = cli(args(images, tmp_path, "optim.max_steps=4", "train.resume_force=true"))
    assert forced.returncode == 0 and "optim.max_steps: 2 -> 4" in forced.stdout
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert "max_steps: 4" in (tmp_path / "config.yaml").read_text()


# --------------------------------------------------------------------------- 10: SIGTERM / SIGINT

KILL_AT_STEP = """
    import os, signal
    from fovea.train import step
    orig = step.Stepper.step
    def train_step(self, batch, sv, *a):
        if sv.step == {step}:
            os.kill(os.getpid(), signal.{sig})  # arrives in the middle of this step
        return orig(self, batch, sv, *a)
    step.Stepper.step = train_step
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_finishes_the_step_saves_and_resumes_exactly(images: Path, tmp_path: Path, sig: str,
                                                            code: int) -> None:
    common = ["optim.max_steps=9", "train.checkpoint_every_steps=100"]
    ref = cli(args(images, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = cli(args(images, run, *common), KILL_AT_STEP.format(step=4, sig=sig))
    assert proc.returncode == code, proc.stderr
    assert f"stopped by {sig} after step 5" in proc.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 5  # the step in flight was finished
    assert not (run / "run.lock").exists() and not (run / "backbone.safetensors").exists()
    again = cli(args(images, run, *common))
    assert again.returncode == 0 and "at step 5/9" in again.stdout
    a, b = total_losses(tmp_path / "ref"), total_losses(run)
    assert sorted(b) == list(range(1, 10)) and all(a[s] == b[s] for s in a)  # bit-identical losses
    ra = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["model"]
    rb = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(ra[k], rb[k]) for k in ra)


# --------------------------------------------------------------------------- 11 / 12: damaged and unsafe files

def _ckpt(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {}}


def test_truncated_last_falls_back_to_newest_readable_step_file(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    save_atomic(_ckpt(4), tmp_path / "step_00000004.pt")
    save_atomic(_ckpt(8), tmp_path / "step_00000008.pt")
    save_atomic(_ckpt(8), tmp_path / "last.pt")
    for name in ("last.pt", "step_00000008.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    ckpt, path = load_resume_checkpoint(tmp_path)
    assert path == tmp_path / "step_00000004.pt" and ckpt["step"] == 4
    err = capsys.readouterr().err
    assert "last.pt is unreadable: resuming from" in err and "step_00000004.pt (step 4)" in err
    (tmp_path / "step_00000004.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint in"):
        load_resume_checkpoint(tmp_path)
    assert load_resume_checkpoint(tmp_path / "none") == (None, None)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_checkpoint_is_refused_and_nothing_runs(images: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "run" / "checkpoints" / "last.pt"
    evil.parent.mkdir(parents=True)
    torch.save({"model": _Evil(str(marker)), "step": 1}, evil)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_checkpoint(evil)
    proc = cli(args(images, tmp_path / "run", "optim.max_steps=2"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fovea: error: refused to load {evil}: it imports posix.system, which would run code on load "
        "(only weights-only checkpoints are read)"]
    ev = subprocess.run([sys.executable, "-m", "fovea", "eval", "knn", str(evil), "--train", f"folder:{images}",
                         "--test", f"folder:{images}"], capture_output=True, text=True, timeout=120)
    assert ev.returncode == 2 and len(ev.stderr.strip().splitlines()) == 1 and "refused to load" in ev.stderr
    assert not marker.exists()


# --------------------------------------------------------------------------- 13: device

def test_device_values_are_checked() -> None:
    for ok in ("cpu", "auto"):
        check_device(ok)
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda, cuda:N"):
        check_device("gpu")
    with pytest.raises(ConfigError, match="train.device"):
        load_config(None, ["train.device=cuda0"])
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA GPU is visible"):
                check_device(dev)


# --------------------------------------------------------------------------- 14: non-finite loss

def test_non_finite_loss_names_step_and_term_and_keeps_last_checkpoint(images: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from fovea.methods.dino import DINO
    from fovea.train.loop import NonFiniteLoss
    orig = DINO.training_step

    def step(self: DINO, batch: dict, sv: object) -> tuple:
        loss, logs = orig(self, batch, sv)
        if sv.step == 4:  # the fifth step: KoLeo blows up
            logs["loss/koleo"] = torch.tensor(float("inf"))
            loss = loss + logs["loss/koleo"]
        return loss, logs

    monkeypatch.setattr(DINO, "training_step", step)
    t = trainer(images, tmp_path, "optim.max_steps=8", "train.checkpoint_every_steps=2", "koleo.weight=0.1")
    with pytest.raises(NonFiniteLoss) as e:
        t.fit()
    msg = str(e.value)
    assert "at step 5/8" in msg and "loss/koleo=inf" in msg and "loss/dino" not in msg and "(step 4)" in msg
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------- 15: file modes

def test_outputs_are_group_readable(images: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        trainer(images, tmp_path, "optim.max_steps=1").fit()
    finally:
        os.umask(old)
    for f in ("backbone.safetensors", "backbone.yaml", "config.yaml", "results.json", "checkpoints/last.pt"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f


def test_loader_workers_start_with_stop_signals_blocked() -> None:
    # A process forked inside the context (as DataLoader workers are) starts with SIGTERM / SIGINT blocked,
    # so a group signal cannot kill it before ignore_stop_signals runs; the context restores the mask.
    import signal

    from fovea.data.loader import ignore_stop_signals, stop_signals_blocked
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with stop_signals_blocked():
        pid = os.fork()
        if pid == 0:  # the "worker"
            held = {signal.SIGTERM, signal.SIGINT} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
            os.kill(os.getpid(), signal.SIGTERM)  # pending, not fatal
            ignore_stop_signals(0)  # ignored, then unblocked: the pending signal is dropped
            os._exit(0 if held else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
