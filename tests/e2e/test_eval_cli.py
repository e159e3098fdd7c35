"""`fovea eval ...` commands end to end on a tiny exported backbone and generated data."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fovea.cli import build_parser, main
from fovea.data.segmentation import make_synthetic_segmentation
from fovea.hub.backbone import export_backbone
from fovea.models.vit import ViTConfig, VisionTransformer

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]


def make_class_folder(root: Path, n_per: int, seed: int) -> Path:
    """3 classes of 16x16 images: a noisy patch of the class colour on noisy grey."""
    rng = np.random.default_rng(seed)
    for c, col in enumerate(COLOURS):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per):
            img = rng.integers(90, 140, (16, 16, 3))
            y, x = rng.integers(0, 6, 2)
            img[y:y + 10, x:x + 10] = np.asarray(col) + rng.integers(-20, 20, (10, 10, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("evalcli")
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(arch="vit_tiny", patch_size=4, img_size=16, embed_dim=48, depth=2,
                                      num_heads=2, drop_path_rate=0.0))
    run = tmp / "run"
    export_backbone(vit, run, extra={"crops": {"mean": [0.5] * 3, "std": [0.25] * 3, "global_size": 16}})
    ood = tmp / "ood"
    ood.mkdir()
    rng = np.random.default_rng(5)
    for i in range(12):  # uniform noise images, nothing like the coloured squares
        Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(ood / f"{i}.png")
    return {"run": run, "train": make_class_folder(tmp / "train", 20, 0), "test": make_class_folder(tmp / "test", 6, 1),
            "ood": ood, "seg_train": make_synthetic_segmentation(tmp / "seg_train", 12, 32, 0),
            "seg_test": make_synthetic_segmentation(tmp / "seg_test", 4, 32, 1)}


def data_args(s: dict) -> list[str]:
    return ["--train", f"folder:{s['train']}", "--test", f"folder:{s['test']}", "--batch-size", "16"]


def test_eval_all_writes_report_json_md_pngs_and_caches(setup, capsys):
    s = setup
    args = ["eval", "all", str(s["run"]), *data_args(s), "--ood", f"folder:{s['ood']}",
            "--seg-train", str(s["seg_train"]), "--seg-test", str(s["seg_test"]), "--seg-epochs", "3",
            "--hb-k", "5", "--epochs", "3", "--shots", "1", "3", "--draws", "2", "--k", "5", "10",
            "--n-images", "4", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    out = s["run"] / "eval"
    assert not res["errors"]
    for name in ("report.json", "report.md", "pca.png", "attention.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["linear"]["test_top1"] == res["linear"]["test_top1"]
    md = (out / "report.md").read_text()
    for text in ("| linear | top1 |", "| logreg | top1 |", "| knn | cls/k=5 |", "ood", "hummingbird", "![pca]"):
        assert text in md, text
    assert set(res["fewshot"]["shots"]) == {"1-shot", "3-shot"}
    assert res["linear"]["n_train"] + res["linear"]["n_val"] == 60 and res["linear"]["n_test"] == 18
    assert set(res["ood"]["scores"]) == {"k=1", "k=50"}
    assert 0 <= res["seg"]["hummingbird"]["miou"] <= 100 and res["seg"]["num_classes"] == 4
    pca = np.asarray(Image.open(out / "pca.png"))
    assert pca.shape == (4 * 130 + 2, 3 * 130 + 2, 3)  # 4 rows x (image, PCA, PCA all) tiles of 128 px + 2 px gaps
    att = np.asarray(Image.open(out / "attention.png"))
    assert att.shape[1] == 4 * 130 + 2  # image, mean, 2 heads
    banks = sorted((out / "cache").glob("bank_*.pt"))
    assert len(banks) == 3  # train, test, ood
    # a second run reads the cached features (same numbers, no new cache files)
    stamps = [b.stat().st_mtime_ns for b in banks]
    assert main(["eval", "all", str(s["run"]), *data_args(s), "--protocols", "knn", "--k", "5",
                 "10", "--json"]) == 0
    res2 = json.loads(capsys.readouterr().out)
    assert res2["knn"] == res["knn"]
    assert [b.stat().st_mtime_ns for b in sorted((out / "cache").glob("bank_*.pt"))] == stamps


def test_single_protocol_commands(setup, capsys):
    s = setup
    assert main(["eval", "linear", str(s["run"]), *data_args(s), "--epochs", "2", "--json", "--out",
                 str(s["run"] / "lin")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["linear"]["grid"]) == {"last1", "last1+mean", "last4", "last4+mean"}
    assert all(len(v) == 13 for v in res["linear"]["grid"].values())
    assert main(["eval", "logreg", str(s["run"]), *data_args(s), "--json", "--out", str(s["run"] / "lr")]) == 0
    assert len(json.loads(capsys.readouterr().out)["logreg"]["sweep"]) == 12
    assert main(["eval", "fewshot", str(s["run"]), *data_args(s), "--shots", "2", "--draws", "3", "--json", "--features", "cls@16",
                 "--out", str(s["run"] / "fs")]) == 0
    assert len(json.loads(capsys.readouterr().out)["fewshot"]["shots"]["2-shot"]["knn"]["runs"]) == 3
    # ood without --ood is a usage error
    with pytest.raises(SystemExit):
        main(["eval", "ood", str(s["run"])])
    # no labelled data and none in the checkpoint's config: a clear config error
    assert main(["eval", "linear", str(s["run"]), "--out", str(s["run"] / "x")]) == 2
    assert "data.eval_train" in capsys.readouterr().err


def test_every_eval_option_has_help():
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    subs = eval_parser._subparsers._group_actions[0].choices
    for name in ("knn", "linear", "logreg", "fewshot", "ood", "seg", "pictures", "all", "retrieval", "copydetect",
                 "video", "correspondence", "depth"):
        assert name in subs, name
        for action in subs[name]._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, (name, action.dest)


def test_eval_final_config_key_is_validated():
    from fovea.config.loader import load_config
    from fovea.errors import ConfigError
    cfg = load_config("dino_vittiny_fmnist", ["eval.final=[linear,logreg]"])
    assert cfg.eval.final == ["linear", "logreg"]
    with pytest.raises(ConfigError, match="eval.final"):
        load_config("dino_vittiny_fmnist", ["eval.final=[linear,bogus]"])


def test_test_classes_restricts_knn_and_linear(setup, tmp_path, capsys):
    """A test set of classes c0 and c2 only (folder labels 0, 1): --test-classes maps label 1 to training class
    2 and restricts the scores; without it class-2 images are scored against label 1 and mostly fail."""
    s = setup
    sub = tmp_path / "sub"
    full = make_class_folder(tmp_path / "full", 6, 1)
    sub.mkdir()
    for c in ("c0", "c2"):
        (full / c).rename(sub / c)
    (tmp_path / "classes.txt").write_text("0\n2\n")
    base = ["--train", f"folder:{s['train']}", "--test", f"folder:{sub}", "--batch-size", "16", "--json"]
    assert main(["eval", "knn", str(s["run"]), *base, "--k", "5"]) == 0
    plain = json.loads(capsys.readouterr().out)["features"]["cls"]["k=5"]
    assert main(["eval", "knn", str(s["run"]), *base, "--k", "5", "--test-classes", str(tmp_path / "classes.txt")]) == 0
    restricted = json.loads(capsys.readouterr().out)["features"]["cls"]["k=5"]
    assert plain <= 60.0 < 90.0 <= restricted
    assert main(["eval", "linear", str(s["run"]), *base, "--epochs", "3", "--out", str(tmp_path / "lin"),
                 "--test-classes", str(tmp_path / "classes.txt")]) == 0
    lin = json.loads(capsys.readouterr().out)["linear"]
    assert lin["test_classes"] == 2 and lin["n_test"] == 12
    (tmp_path / "bad.txt").write_text("0 7")
    assert main(["eval", "knn", str(s["run"]), *base, "--test-classes", str(tmp_path / "bad.txt")]) == 2
    assert "only 3 classes" in capsys.readouterr().err
