"""End-to-end runs of the training loop on tiny models and generated images.

Covers: exact resume after SIGKILL, 2-rank torchrun (gloo) == 1 process, corrupt images
skipped and counted, a misspelt config key failing before any work.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_resumes_exactly, base_args, losses, make_folder, run_cli, run_torchrun

def test_resume_after_sigkill_continues_same_losses(folder: Path, tmp_path: Path) -> None:
    common = base_args(folder, tmp_path / "a") + ["data.batch_size=8", "optim.max_steps=14",
                                                 "train.checkpoint_every_steps=4"]
    run_cli(common)
    ref = losses(tmp_path / "a")
    assert sorted(ref) == list(range(1, 15))

    # Same run, killed with SIGKILL as step 11 begins (after the step-8 checkpoint): the process dies without
    # any clean-up, as in a crash or an OOM kill; the same command resumes at step 8 on the same losses.
    assert_resumes_exactly(common, tmp_path / "a", tmp_path / "b", 10, "8/14")


def test_torchrun_two_ranks_match_one_process(folder: Path, tmp_path: Path) -> None:
    # dino.use_bn=false: head BatchNorm is synchronised across GPUs (SyncBatchNorm) but per rank on
    # CPU/gloo, where exact 1-vs-2-rank equality therefore only holds without it.
    steps = ["optim.max_steps=4", "train.checkpoint_every_steps=100", "train.threads=1", "dino.use_bn=false"]
    run_cli(base_args(folder, tmp_path / "one") + ["data.batch_size=8", *steps])
    run_torchrun(base_args(folder, tmp_path / "two") + ["data.batch_size=4", *steps])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=1e-4), (s, one[s], two[s])
    # the loss must actually move, or equality would prove nothing
    assert abs(one[4] - one[1]) > 1e-4


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "imgs", n_per_class=16, corrupt=3)
    out = tmp_path / "run"
    proc = run_cli(base_args(data, out) + ["data.batch_size=8", "optim.epochs=1"])
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_images"] >= 4  # 3 corrupt files + one 1x1 image, each drawn once per epoch
    assert "skipped" in proc.stdout and "unreadable" in proc.stdout


def test_folder_without_readable_images_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "bad"
    data.mkdir()
    for i in range(3):
        (data / f"x{i}.jpg").write_bytes(b"garbage")
    proc = run_cli(base_args(data, tmp_path / "run"), check=False)
    assert proc.returncode != 0
    assert "no readable image" in proc.stderr and str(data) in proc.stderr


def test_misspelt_key_fails_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(["dino_vittiny_fmnist", f"output_dir={out}", "optim.lrr=1e-3"], check=False)
    assert proc.returncode == 2
    assert "optim.lrr" in proc.stderr and "did you mean 'lr'" in proc.stderr
    assert not out.exists()


def test_eval_knn_cli_json(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_cli(base_args(folder, out) + ["data.batch_size=8", "optim.max_steps=2"])
    proc = subprocess.run([sys.executable, "-m", "fovea", "eval", "knn", str(out), "--train", f"folder:{folder}",
                           "--test", f"folder:{folder}", "--k", "1", "5", "--features", "cls,both", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # the bank equals the test set, so k=1 finds each image itself: 100%
    assert res["features"]["cls"]["k=1"] == pytest.approx(100.0)
    assert set(res["features"]) == {"cls", "both"} and res["n_train"] == 48


FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST absent (apt-get install dataset-fashion-mnist); real-data run skipped")
def test_demo_preset_runs_end_to_end_on_fashion_mnist(tmp_path: Path) -> None:
    """The demo preset itself (model shrunk, few steps) on the real data: k-NN before/after,
    every output of the run folder, and a resolved config that reloads to the same config."""
    out = tmp_path / "run"
    proc = run_cli(["dino_vittiny_fmnist", f"output_dir={out}", "model.depth=2", "optim.max_steps=3",
                    "data.eval_train.limit=600", "data.eval_test.limit=300", "data.num_workers=0",
                    "train.progress=false", "train.threads=1"])
    for name in ("config.yaml", "metrics.jsonl", "results.json", "backbone.safetensors", "backbone.yaml",
                 "checkpoints/last.pt"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "k-NN start" in proc.stdout and "k-NN end" in proc.stdout and str(out / "config.yaml") in proc.stdout
    res = json.loads((out / "results.json").read_text())
    for tag in ("start", "end"):
        accs = res["knn"][tag]["features"]["cls"]
        assert set(accs) == {"k=10", "k=20", "k=100", "k=200"}
        assert accs["k=20"] > 30.0  # 10 classes: chance is 10%; even a 2-block random ViT is far above it
    from fovea.config.loader import load_config
    again = load_config(str(out / "config.yaml"))
    assert again.model.depth == 2 and again.optim.max_steps == 3 and again.dino.out_dim == 1024


def test_persistent_workers_give_the_in_process_batches(folder: Path, tmp_path: Path) -> None:
    """Three epochs with one data worker that persists across them == the same run loading in-process."""
    common = ["data.batch_size=16", "optim.epochs=3", "train.checkpoint_every_steps=100"]
    run_cli(base_args(folder, tmp_path / "w0") + common)
    run_cli(base_args(folder, tmp_path / "w1") + common + ["data.num_workers=1"])
    a, b = losses(tmp_path / "w0"), losses(tmp_path / "w1")
    assert sorted(a) == sorted(b) == list(range(1, 10))  # 48 images / 16 = 3 steps x 3 epochs
    assert all(a[s] == b[s] for s in a)
