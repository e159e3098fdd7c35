"""End-to-end runs with ``crops.augment=batched`` (the loader sends canvases, the stepper crops them).

Covers: exact resume after SIGKILL (iBOT masks and a loader worker included), 2-rank torchrun (gloo) == 1
process, that the switch changes the crops (the per-image run's losses differ), a run through the
high-resolution phase with the Gram teacher's own crops, and the throughput benchmark's --augment-compare.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_resumes_exactly, base_args, losses, run_cli, run_torchrun

BATCHED = ["crops.augment=batched"]


def test_batched_resume_after_sigkill_continues_same_losses(folder: Path, tmp_path: Path) -> None:
    common = base_args(folder, tmp_path / "a") + BATCHED + [
        "data.batch_size=8", "optim.max_steps=10", "train.checkpoint_every_steps=4", "ibot.enabled=true",
        "data.num_workers=1"]
    run_cli(common)
    ref = losses(tmp_path / "a")
    assert sorted(ref) == list(range(1, 11))
    assert sorted(losses(tmp_path / "a", "loss/ibot")) == list(range(1, 11))

    # SIGKILL as step 7 begins (steps 5, 6 logged but not checkpointed), then the same command again
    assert_resumes_exactly(common, tmp_path / "a", tmp_path / "b", 6, "4/10")


def test_batched_two_ranks_match_one_process_and_differ_from_per_image(folder: Path, tmp_path: Path) -> None:
    # dino.use_bn=false: head BatchNorm is per rank on CPU/gloo (see test_dino_runs)
    steps = ["optim.max_steps=4", "train.checkpoint_every_steps=100", "train.threads=1", "dino.use_bn=false"]
    run_cli(base_args(folder, tmp_path / "one") + BATCHED + ["data.batch_size=8", *steps])
    run_torchrun(base_args(folder, tmp_path / "two") + BATCHED + ["data.batch_size=4", *steps])
    run_cli(base_args(folder, tmp_path / "per_image") + ["data.batch_size=8", *steps])
    one, two, per_image = losses(tmp_path / "one"), losses(tmp_path / "two"), losses(tmp_path / "per_image")
    assert sorted(one) == sorted(two) == sorted(per_image) == [1, 2, 3, 4]
    for s in one:
        assert two[s] == pytest.approx(one[s], abs=1e-4), (s, one[s], two[s])
    assert abs(one[4] - one[1]) > 1e-4  # the loss moves, or equality would prove nothing
    # same images, same weights, other crops: the batched path is really the one that ran
    assert abs(one[1] - per_image[1]) > 1e-4


def test_batched_highres_phase_with_gram_crops_and_ibot(folder: Path, tmp_path: Path) -> None:
    # steps 5-6 switch to 24/12-px crops (a new loader, the augmentation of that phase); the Gram teacher
    # gets its own 32-px (48 in the phase) crops of the global boxes
    out = tmp_path / "run"
    run_cli(base_args(folder, out) + BATCHED + [
        "data.batch_size=8", "optim.max_steps=6", "highres.steps=2", "highres.global_size=24",
        "highres.local_size=12", "ibot.enabled=true", "gram.enabled=true", "gram.teacher_size=32", "gram.start=1"])
    for key in ("loss/dino", "loss/ibot", "loss/gram"):
        got = losses(out, key)
        assert sorted(got) == list(range(1, 7)) and all(math.isfinite(v) for v in got.values()), key
    assert losses(out, "loss/gram")[6] > 0


def test_benchmark_augment_compare_measures_both_modes(folder: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_throughput_aug", REPO / "benchmarks" / "train_throughput.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_throughput_aug", bench)
    spec.loader.exec_module(bench)
    path = tmp_path / "aug.json"
    import torch
    threads = torch.get_num_threads()
    try:
        bench.main(["dino_vittiny_fmnist", "model.depth=1", "model.embed_dim=48", "model.num_heads=3",
                    "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "data.batch_size=8",
                    "data.num_workers=0", "train.threads=1", "data.train.kind=folder", f"data.train.path={folder}",
                    "--steps", "1", "--warmup", "1", "--matmul-sizes", "64", "--matmul-time", "0.02",
                    "--no-model-shapes", "--no-flop-counter", "--augment-compare", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(path.read_text())
    rows = {r["augment"]: r for r in res["augment_compare"]}
    assert set(rows) == {"per_image", "batched"}
    for r in rows.values():
        assert r["step_only_images_per_s"] > 0 and r["loop_images_per_s"] > 0 and r["loop_data_wait_ms"] >= 0
    assert rows["batched"]["canvas"] == {"side": 24, "from": "auto (data.train)"}  # the 24-px folder images
    runs = res["runs"]
    assert [runs[k]["augment"] for k in ("per_image/synthetic", "per_image/real", "batched/synthetic",
                                         "batched/real")] == ["per_image", "per_image", "batched", "batched"]
    assert [runs[k]["data"] for k in ("batched/synthetic", "batched/real")] == ["synthetic", "real"]
