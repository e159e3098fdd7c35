"""The `fovea` command surface: help texts, presets listing, config errors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from fovea.cli import build_parser, main
from fovea.config.loader import describe


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fovea", *args], capture_output=True, text=True, timeout=120)


def test_help_texts_describe_every_option() -> None:
    top = run("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "eval", "presets", "data"))
    train = run("train", "--help").stdout
    rows = describe()
    assert len(rows) > 60
    for key, _, _, text in rows:  # every config key is listed with a description
        assert key in train, key
        assert text, f"config key {key} has no help text"
    knn = run("eval", "knn", "--help").stdout
    for opt in ("--train", "--test", "--k", "--temperature", "--features", "--json", "--size", "--which"):
        assert opt in knn
    for action in build_parser()._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions[0] \
            .choices["knn"]._actions:
        assert action.help, action.dest


def test_presets_listed_one_line_each() -> None:
    out = run("presets").stdout.strip().splitlines()
    names = [ln.split()[0] for ln in out]
    for name in ("dino_vittiny_fmnist", "dino_vittiny_cifar10", "dino_vits16_imagenet"):
        assert name in names
    assert all(len(ln.split(maxsplit=1)) == 2 for ln in out)  # every preset has a description


def test_unknown_preset_and_bad_value_are_named(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "dino_vittiny_fmnst"]) == 2
    err = capsys.readouterr().err
    assert "dino_vittiny_fmnst" in err and "did you mean 'dino_vittiny_fmnist'" in err
    assert main(["train", "dino_vittiny_fmnist", "data.batch_size=many"]) == 2
    assert "data.batch_size" in capsys.readouterr().err
    assert main(["train", "dino_vittiny_fmnist", "crops.global_size=30"]) == 2  # not a multiple of patch 7
    assert "crops.global_size" in capsys.readouterr().err


def test_imagenet_recipe_is_the_published_one() -> None:
    from fovea.config.loader import load_config
    cfg = load_config("dino_vits16_imagenet")
    assert (cfg.model.arch, cfg.model.patch_size, cfg.dino.out_dim) == ("vit_small", 16, 65536)
    assert (cfg.optim.lr, cfg.optim.lr_scaling, cfg.data.batch_size) == (5e-4, "linear256", 64)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.momentum_teacher) == (0.04, 0.4, 0.996)
    assert (cfg.dino.warmup_teacher_temp, cfg.dino.teacher_temp, cfg.dino.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert cfg.crops.blur_p == [1.0, 0.1, 0.5] and cfg.crops.solarize_p == 0.2 and not cfg.crops.dinov2_inverted_blur
    assert (cfg.crops.n_local, cfg.crops.global_size, cfg.crops.local_size) == (8, 224, 96)
    assert cfg.optim.clip_grad == 3.0 and cfg.optim.freeze_last_layer_epochs == 1
    assert dataclasses.asdict(cfg)  # resolvable
