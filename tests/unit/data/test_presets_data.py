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
