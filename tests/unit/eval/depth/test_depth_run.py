"""run() end to end on a tiny NYU folder with a tiny random ViT: training lowers the loss, files written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from depth_helpers import default_opts, tiny_ctx, write_nyu
from fovea.eval.depth.metrics import METRICS
from fovea.eval.depth.protocol import PROTOCOL
from fovea.eval.depth.runner import run
from fovea.eval.plugin import load_protocol
from fovea.eval.protocols import PAPER_PROTOCOLS


def test_run_end_to_end(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu", n_train=8, n_test=3)
    out, preds = tmp_path / "out", tmp_path / "preds"
    res = run(tiny_ctx(out), default_opts(f"nyu:{root}", epochs=6, lr=1e-2, probe_batch=4, pictures=2,
                                          save_predictions=str(preds)))
    assert res["train_loss"][-1] < res["train_loss"][0]
    assert set(METRICS) <= set(res) and all(np.isfinite(res[k]) for k in METRICS)
    assert 0 <= res["a1"] <= 100 and res["rmse"] > 0
    assert (res["n_train"], res["n_test"], res["n_test_scored"], res["skipped"]) == (8, 3, 3, 0)
    s = res["settings"]
    assert s["blocks"] == [1] and s["channels"] == 96 and s["input_sizes"] == ["32x40"]
    assert s["eigen_cropped_test_images"] == 0 and s["cache"] is True
    from safetensors.torch import load_file
    state = load_file(res["head"])
    assert state["weight"].shape == (256, 96, 1, 1) and state["bins"][0] == pytest.approx(1e-3)
    info = json.loads(Path(res["head_settings"]).read_text())
    assert info["settings"]["probe"] == "lin1" and info["backbone"]["patch_size"] == 8
    files = sorted(preds.rglob("*.npy"))
    assert [f.relative_to(preds).as_posix() for f in files] == [f"test_scene/rgb_{i:05d}.npy" for i in range(3)]
    for f in files:
        p = np.load(f)
        assert p.shape == (32, 40) and p.dtype == np.float32
        assert 1e-3 <= p.min() and p.max() <= 10.0 and 0.5 < p.mean() < 8.0  # metres
    assert len(res["pictures"]) == 2 and all(Path(p).is_file() for p in res["pictures"])
    base = res["baselines"]
    assert 1.0 < base["train_mean_depth"] < 5.0 and set(METRICS) <= set(base["mean_map"])
    json.dumps(res)
    md = "\n".join(PROTOCOL.markdown(res))
    assert "| probe |" in md and res["pictures"][0] in md
    assert PROTOCOL.headline(res)["rmse"] == res["rmse"] and "depth lin1" in PROTOCOL.summary(res)[0]


def test_run_lin4_uncached_flip_softmax(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu", n_train=4, n_test=2, h=16, w=24)
    (root / "train_scene" / "rgb_00001.png").write_bytes(b"broken")
    res = run(tiny_ctx(tmp_path / "out", depth=4), default_opts(
        f"nyu:{root}", probe="lin4", cache="false", flip="true", bin_norm="softmax", epochs=2, probe_batch=2,
        pictures=0, baselines="false", eigen_crop="true"))
    assert res["settings"]["blocks"] == [1, 2, 3, 4] and res["settings"]["channels"] == 384
    assert res["settings"]["cache"] is False and res["pictures"] == [] and res["baselines"] is None
    assert res["n_train"] == 3 and res["skipped"] == 1 and res["skipped_files"]["train"] == ["train_scene/rgb_00001.png"]
    assert res["settings"]["eigen_cropped_test_images"] == 2 and np.isfinite(res["rmse"])


def test_protocol_registered_and_options() -> None:
    proto = load_protocol(PAPER_PROTOCOLS["depth"])
    assert proto is PROTOCOL and proto.name == "depth"
    flags = {o.flag for o in proto.options}
    assert {"data", "probe", "bins", "min-depth", "max-depth", "bin-norm", "eigen-crop", "size", "save-predictions",
            "pictures"} <= flags


def test_bad_option_refused(tmp_path: Path) -> None:
    from fovea.errors import ConfigError
    root = write_nyu(tmp_path / "nyu", n_train=2, n_test=1)
    with pytest.raises(ConfigError, match="--min-depth"):
        run(tiny_ctx(tmp_path / "out"), default_opts(f"nyu:{root}", min_depth=5.0, max_depth=1.0))
