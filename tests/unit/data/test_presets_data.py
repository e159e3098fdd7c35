"""Every shipped preset that reads the project's data ($FOVEA_DATA) points at files that exist there."""
from __future__ import annotations

from pathlib import Path

import pytest

from fovea.config.loader import load_config, preset_names
from fovea.data.sources import build_source, default_data_root

ROOT = Path(default_data_root())


@pytest.mark.skipif(not (ROOT / "cifar10").is_dir() or not (ROOT / "imagenette").is_dir(),
                    reason=f"project data (cifar10/, imagenette/) not found under {ROOT}; set FOVEA_DATA")
@pytest.mark.parametrize("name", preset_names())
def test_preset_data_paths_exist_under_fovea_data(name: str) -> None:
    cfg = load_config(name)
    splits = {s: getattr(cfg.data, s) for s in ("train", "eval_train", "eval_test")}
    used = {s: c for s, c in splits.items() if c is not None and "$FOVEA_DATA" in c.path}
    for split, src in used.items():
        source = build_source(src)  # raises (naming the path) when the file or folder is missing
        assert len(source) > 1000, (name, split, src.path)


def test_small_budget_dino_presets_share_the_recipe_at_16_tokens_per_global_crop() -> None:
    """The CPU DINO presets (README "Quality per CPU-minute") differ in data and size, not in recipe: 16 tokens per
    global crop, 4 per local crop, KoLeo 0.1, batched augmentation with the loader in the training process, and
    the images and updates per minute of 2026-12-03: 2 local crops, batch 64, a long schedule cut by the clock."""
    for name in ("dino_vittiny_fmnist", "dino_vittiny_cifar10", "dino_vittiny_imagenette64"):
        c = load_config(name)
        p = c.model.patch_size
        assert (c.crops.global_size // p) ** 2 == 16 and (c.crops.local_size // p) ** 2 == 4, name
        assert c.crops.global_size % p == 0 and c.crops.local_size % p == 0, name
        assert (c.model.depth, c.dino.out_dim, c.koleo.weight) == (4, 1024, 0.1), name
        assert (c.crops.augment, c.data.num_workers) == ("batched", 0), name
        assert (c.crops.n_local, c.data.batch_size) == (2, 64) and c.train.max_minutes > 0, name
        size = c.data.eval_size or c.crops.global_size
        assert size == c.crops.global_size == c.model.img_size, name  # evaluated at the trained size
