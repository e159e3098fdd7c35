"""Smoke tests of benchmarks/train_throughput.py.

Only ``test_tiny_model_json_and_analytic_flops`` runs by default (a one-block model, one step,
a few seconds); the others are real measurements, marked ``benchmark`` (run with ``-m benchmark``).
"""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from fovea.config.loader import load_config
from fovea.methods.registry import spec_for

from helpers import REPO  # noqa: E402
SCRIPT = REPO / "benchmarks" / "train_throughput.py"

TINY = ["model.depth=1", "model.embed_dim=48", "model.num_heads=3", "dino.out_dim=64", "dino.hidden_dim=32",
        "dino.bottleneck_dim=256", "dino.use_bn=false",  # the head the hand count below assumes
        "data.batch_size=4", "crops.n_local=6"]  # 6 local crops: the hand count below
FAST = ["--matmul-sizes", "128", "--matmul-time", "0.05"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_throughput", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def hand_flops_tiny() -> int:
    """One training step of dino_vittiny_fmnist + TINY, by hand.

    D=48, MLP hidden 4*48=192, 1 block, patch 7, 3 channels; global crops 28 px -> 16 patches + CLS
    = 17 tokens, local crops 14 px -> 4 patches + CLS = 5 tokens; head 48 -> 32 -> 32 -> 256, K=64;
    batch 4 -> 8 global crops and 6*4=24 local crops per step.
    """
    D, H = 48, 192
    patch_g, patch_l = 2 * 16 * (3 * 7 * 7) * D, 2 * 4 * (3 * 7 * 7) * D
    block_g = 2 * 17 * (3 * D * D + D * D + 2 * D * H) + 2 * 2 * 17 * 17 * D
    block_l = 2 * 5 * (3 * D * D + D * D + 2 * D * H) + 2 * 2 * 5 * 5 * D
    head = 2 * (D * 32 + 32 * 32 + 32 * 256) + 2 * 256 * 64
    fwd_g, fwd_l = patch_g + block_g + head, patch_l + block_l + head
    teacher = 8 * fwd_g
    student = 8 * fwd_g + 24 * fwd_l
    # student backward = 2x forward, minus the patch-embed input gradient (images need none)
    return teacher + student + (2 * student - 8 * patch_g - 24 * patch_l)


def test_tiny_model_json_and_analytic_flops(bench, tmp_path, keep_threads):
    out = tmp_path / "tiny.json"
    res = bench.main([*TINY, "--steps", "1", "--warmup", "0", *FAST, "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["images_per_s"] > 0 and data["gflops"] > 0
    assert data["matmul_peak"]["best_gflops"] > 0
    assert data["step_time_s"]["mean"] > 0 and len(data["step_times_s"]) == 1
    assert data["peak_memory"]["bytes"] > 0
    assert data["params"]["student_trainable"] > 0
    assert data["tokens_per_image"] == {"global_crop": 17, "local_crop": 5, "student": 2 * 17 + 6 * 5,
                                        "teacher": 34}
    # the analytic count for this one-block model is the hand formula, exactly
    assert hand_flops_tiny() == 65_881_600
    assert data["flops"]["analytic"] == hand_flops_tiny()
    cfg = load_config("dino_vittiny_fmnist", TINY)
    assert spec_for(cfg.method).flops(cfg, {})["total"] == hand_flops_tiny()  # the method's own count
    # FlopCounterMode sees the same matmuls (attention backward recomputes scores: slightly more)
    if data["flops"]["flop_counter"]:
        assert 0.9 <= data["flops"]["counter_over_analytic"] <= 1.1
    assert res["images_per_s"] == data["images_per_s"]
    # every option is documented in --help
    text = bench.build_parser().format_help()
    for opt in ("--steps", "--warmup", "--batch-size", "--device", "--json", "--synthetic", "--real-data",
                "--compare", "--start-step", "--n-images", "--matmul-sizes", "--matmul-time", "--no-model-shapes",
                "--no-flop-counter", "preset", "overrides"):
        assert opt in text


@pytest.mark.benchmark
def test_default_preset_two_steps(bench, tmp_path, keep_threads):
    res = bench.main(["--steps", "2", "--warmup", "1", "--json", str(tmp_path / "r.json")])
    assert res["images_per_s"] > 0 and 0 < res["frac_of_peak"] < 1.5
    assert res["flops"]["agree_within_10pct"] in (True, None)


@pytest.mark.benchmark
def test_compare_rows(bench, tmp_path, keep_threads, capsys):
    res = bench.main([*TINY, "--steps", "1", "--warmup", "0", *FAST, "--compare", "data.batch_size=2,4",
                      "--json", str(tmp_path / "c.json")])
    assert res["values"] == ["2", "4"] and [r["batch_size"] for r in res["runs"]] == [2, 4]
    assert res["runs"][1]["flops"]["analytic"] == 2 * res["runs"][0]["flops"]["analytic"]
    assert "data.batch_size" in capsys.readouterr().out


@pytest.mark.benchmark
def test_real_data(bench, tmp_path, keep_threads):
    try:
        from fovea.data.sources import find_fmnist_dir
        find_fmnist_dir()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not available: {e}")
    res = bench.main([*TINY, "data.num_workers=0", "--real-data", "--steps", "2", "--warmup", "1", *FAST,
                      "--json", str(tmp_path / "d.json")])
    assert res["data"] == "real" and res["images_per_s_with_data"] > 0


IJEPA_TINY = ["model.depth=1", "model.embed_dim=48", "model.num_heads=3", "ijepa.pred_dim=24", "ijepa.pred_depth=1",
              "ijepa.pred_heads=3", "data.batch_size=4"]


def test_ijepa_step_json_and_analytic_flops(bench, tmp_path, keep_threads):
    """I-JEPA: the benchmark runs the method's own batch (one view + multi-block masks) and counts its FLOPs."""
    out = tmp_path / "ijepa.json"
    res = bench.main(["ijepa_vittiny_cifar10", *IJEPA_TINY, "--steps", "1", "--warmup", "0", *FAST,
                      "--json", str(out), "--n-images", "64"])
    data = json.loads(out.read_text())
    assert data["method"] == "ijepa" and data["images_per_s"] > 0 and res["images_per_s"] == data["images_per_s"]
    assert data["last_loss"] is not None and data["last_loss"] > 0
    # hand count from the padded shapes of the synthetic batch: 32 px / patch 4 = 64 patches, no CLS,
    # D=48 (MLP 192), predictor 24 wide (MLP 96), one block each, batch 4
    cfg = load_config("ijepa_vittiny_cifar10", IJEPA_TINY)
    batch = spec_for(cfg.method).synthetic_batch(cfg, torch.device("cpu"))
    b, m, nt = batch["tgt_idx"].shape
    nc = batch["ctx_idx"].shape[1]
    assert (b, m) == (4, 4) and 10 <= nc <= 64 and 1 <= nt <= 64
    D, H, P, HP = 48, 192, 24, 96

    def block(n: int, d: int, h: int) -> int:
        return 2 * n * (4 * d * d + 2 * d * h) + 4 * n * n * d

    patch = 2 * 64 * (3 * 4 * 4) * D
    target = 4 * (patch + block(64, D, H))
    student = 4 * (patch + block(nc, D, H)) + 16 * (2 * nc * D * P + block(nc + nt, P, HP) + 2 * nt * P * D)
    # student backward = 2x forward, minus the patch-embed input gradient of the 4 images
    assert data["flops"]["analytic"] == target + 3 * student - 4 * patch
    assert data["tokens_per_image"] == {"global_crop": 64, "local_crop": 0, "teacher": 64, "student": nc,
                                        "predictor": 4 * (nc + nt)}
    if data["flops"]["flop_counter"]:
        assert 0.9 <= data["flops"]["counter_over_analytic"] <= 1.1
