"""Shared helpers of the test suite (importable from every test module: ``tests`` is on ``pythonpath``).

Tiny configs, generated image folders, and ``fovea train`` run in a subprocess, alone or under torchrun.
Fixtures built on them are in ``tests/conftest.py``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

#: what the tests assume of the DINO presets whatever their tuning (dino_vittiny_fmnist has KoLeo and batched
#: augmentation): no KoLeo (per rank: 2 ranks == 1 process would not hold) and per-image augmentation
PLAIN = ["koleo.weight=0", "crops.augment=per_image"]

#: a 2-block ViT on 16-px images with small heads: a DINO run of a few steps takes seconds
TINY = [
    "model.arch=vit_tiny", "model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4",
    "model.img_size=16", "model.drop_path_rate=0.0", "crops.global_size=16", "crops.local_size=8",
    "crops.n_local=2", "dino.out_dim=64", "dino.hidden_dim=64", "dino.bottleneck_dim=16",
    "data.num_workers=0", "train.progress=false", "train.log_every_steps=1", "eval.at_end=false",
    "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.25", "train.threads=1",
    *PLAIN,
]

#: a 2-block ViT with small heads for in-process method tests (no run settings)
TINY_MODEL = ["model.arch=vit_tiny", "model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4",
              "model.img_size=16", "crops.global_size=16", "crops.local_size=8", "crops.n_local=2", "dino.out_dim=64",
              "dino.hidden_dim=32", "dino.bottleneck_dim=16", *PLAIN]

#: a 1-block, 32-wide ViT with the DINOv2 parts (Sinkhorn-Knopp, iBOT with its own head, KoLeo), in-process
TINY_SD = ["model.arch=vit_tiny", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.patch_size=4",
           "model.img_size=16", "crops.global_size=16", "crops.local_size=8", "crops.n_local=1", "dino.out_dim=64",
           "dino.hidden_dim=24", "dino.bottleneck_dim=16", "dino.centering=sinkhorn", "ibot.enabled=true",
           "ibot.out_dim=32", "koleo.weight=0.1", "model.drop_path_rate=0"]

#: a 1-block ViT run (no workers, no progress bar) for in-process Trainer tests
TINY_RUN = ["model.arch=vit_tiny", "model.depth=1", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4",
            "model.img_size=16", "crops.global_size=16", "crops.local_size=8", "crops.n_local=1", "dino.out_dim=32",
            "dino.hidden_dim=32", "dino.bottleneck_dim=8", "data.num_workers=0", "train.progress=false", *PLAIN]

#: the I-JEPA counterpart of TINY (apply to an I-JEPA preset)
JEPA_TINY = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "model.patch_size=4", "model.img_size=16",
             "crops.global_size=16", "ijepa.pred_dim=24", "ijepa.pred_depth=2", "ijepa.pred_heads=3",
             "ijepa.min_context=4", "data.num_workers=0", "train.progress=false", "train.log_every_steps=1",
             "train.threads=1", "data.batch_size=8", "optim.warmup_epochs=0.5", "eval.at_start=false"]


def make_folder(root: Path, n_per_class: int = 24, corrupt: int = 0) -> Path:
    """Two classes of coloured 24x24 images; optionally add corrupt files."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
            arr[..., c] = 255
            Image.fromarray(arr).save(d / f"{i:03d}.png")
    for i in range(corrupt):
        (root / "a" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "a" / "tiny.png").unlink(missing_ok=True)
    if corrupt:
        Image.new("RGB", (1, 1)).save(root / "b" / "tiny.png")
    return root


def base_args(data: Path, out: Path) -> list[str]:
    """``fovea train`` arguments of a TINY DINO run on the image folder ``data`` into ``out``."""
    return ["dino_vittiny_fmnist", *TINY, f"output_dir={out}", "data.train.kind=folder",
            f"data.train.path={data}", "data.eval_train=null", "data.eval_test=null"]


def run_cli(args: list[str], env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``fovea train ARGS`` in a subprocess (one thread); raises with its output when it fails and ``check``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "fovea", "train", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fovea train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_killed_at(args: list[str], step: int) -> subprocess.CompletedProcess:
    """``fovea train ARGS`` in a subprocess that kills itself with SIGKILL as step ``step`` begins (no clean-up,
    as in a crash or an OOM kill)."""
    killer = textwrap.dedent(f"""
        import os, signal, sys
        from fovea.train import step as st
        orig = st.Stepper.step
        def train_step(self, batch, sv, *a):
            if sv.step == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, batch, sv, *a)
        st.Stepper.step = train_step
        from fovea.cli import main
        sys.exit(main(["train", *{args!r}]))
    """)
    return subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_resumes_exactly(common: list[str], a: Path, b: Path, kill_at: int, resumed_at: str) -> None:
    """Rerun the finished run ``common`` (whose output_dir is ``a``) into ``b``, SIGKILL it as step ``kill_at + 1``
    begins, run it again: it must resume at ``resumed_at`` ("S/TOTAL") and log ``a``'s losses at every step."""
    ref = losses(a)
    moved = [x.replace(str(a), str(b)) for x in common]
    proc = run_killed_at(moved, kill_at)
    assert proc.returncode == -9, proc.stderr
    assert (b / "checkpoints" / "last.pt").exists()
    assert max(losses(b)) == kill_at  # the steps after the last checkpoint were logged, not saved
    out = run_cli(moved)
    assert "resumed from" in out.stdout and f"at step {resumed_at}" in out.stdout, out.stdout
    got = losses(b)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (asked from the OS, not fixed in the test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``fovea train ARGS`` under torchrun with ``nproc`` CPU ranks (gloo, one thread each) on a free port."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "fovea", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def rows(run: Path) -> dict[int, dict]:
    """The logged rows of a run's metrics.jsonl by step."""
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step" in r}


def losses(run: Path, key: str = "loss/dino") -> dict[int, float]:
    """step -> the logged ``key`` of a run (from every row that has it)."""
    found = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in found if key in r}
