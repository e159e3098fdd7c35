"""``fovea embed``: one row per readable image, features equal to the backbone's own outputs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize
from fovea.data.sources import FolderSource
from fovea.eval.embed import embed
from fovea.hub.backbone import export_backbone
from fovea.models.vit import ViTConfig, VisionTransformer


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(10):
        d = tmp_path / "imgs" / "xy"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "imgs" / "x" / "bad.png").write_bytes(b"not a png")
    return tmp_path / "imgs"


def test_embed_parquet_rows_and_values(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(arch="vit_tiny", depth=2, embed_dim=32, num_heads=2, patch_size=4, img_size=16,
                                      num_register_tokens=2)).eval()
    src = FolderSource(str(data))
    res = embed(vit, src, tmp_path / "e.parquet", ["cls", "mean_patch", "registers", "cls@8"], 16,
                torch.device("cpu"), batch_size=4, progress=False)
    assert (res["rows"], res["skipped"]) == (10, 1) and res["dims"] == {"cls": 32, "mean_patch": 32, "registers": 32,
                                                                         "cls@8": 8}
    t = pq.read_table(tmp_path / "e.parquet").to_pydict()
    assert len(t["index"]) == 10 and all(not p.endswith("bad.png") for p in t["path"])
    assert sorted(set(t["label"])) == [0, 1]
    # independent re-derivation for every row: the backbone's own forward on the same evaluation view
    for row in range(10):
        i = t["index"][row]
        assert t["path"][row] == src.paths[i] and t["label"][row] == src.labels[i]
        x = normalize(eval_transform(src.load(i), 16)[None], IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            out = vit.forward_features(x)
        assert np.allclose(t["cls"][row], out.cls[0].numpy(), atol=1e-5)
        assert np.allclose(t["mean_patch"][row], out.patches[0].mean(0).numpy(), atol=1e-5)
        assert np.allclose(t["registers"][row], out.registers[0].mean(0).numpy(), atol=1e-5)
        assert np.allclose(t["cls@8"][row], out.cls[0, :8].numpy(), atol=1e-5)


def test_embed_cli_npy_from_a_backbone_folder(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    vit = VisionTransformer(ViTConfig(arch="vit_tiny", depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16))
    export_backbone(vit.eval(), tmp_path / "bb", extra={"crops": {"mean": [0.5] * 3, "std": [0.25] * 3,
                                                                  "global_size": 16}})
    proc = subprocess.run([sys.executable, "-m", "fovea", "embed", str(tmp_path / "bb"), "--data", f"folder:{data}",
                           "--out", str(tmp_path / "e.npy"), "--features", "cls,both", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mat, idx = np.load(tmp_path / "e.npy"), np.load(tmp_path / "e.index.npy")
    assert mat.shape == (10, 32 + 64) and idx.shape == (10,)
    src = FolderSource(str(data))
    x = normalize(eval_transform(src.load(int(idx[3])), 16)[None], [0.5] * 3, [0.25] * 3)  # the model's own normalisation
    with torch.no_grad():
        out = vit.eval().forward_features(x)
    cls, mp = out.cls[0], out.patches[0].mean(0)
    want = torch.cat([cls, F.normalize(cls, dim=0), F.normalize(mp, dim=0)]).numpy()
    assert np.allclose(mat[3], want, atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "fovea", "embed", str(tmp_path / "bb"), "--data", f"folder:{data}",
                          "--out", str(tmp_path / "e.csv")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must end in .parquet or .npy" in bad.stderr
