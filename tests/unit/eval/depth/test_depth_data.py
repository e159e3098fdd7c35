"""The NYU reader on tiny folders in the BTS / ZoeDepth layout, and its refusals naming the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from depth_helpers import default_opts, tiny_ctx, write_nyu
from fovea.errors import ConfigError
from fovea.eval.depth.data import check_split, input_size, parse_spec, read_depth, read_list, read_pair
from fovea.eval.depth.runner import run


@pytest.mark.parametrize("fields", [2, 3])
def test_reader(tmp_path: Path, fields: int) -> None:
    root = write_nyu(tmp_path, n_train=3, n_test=2, h=20, w=30, fields=fields)
    pairs = read_list(root, "train")
    assert len(pairs) == 3 and pairs[0].rel == "train_scene/rgb_00000.png"
    assert pairs[0].depth == root / "train_scene" / "sync_depth_00000.png"  # leading slash stripped
    assert pairs[0].focal == (518.8579 if fields == 3 else None)
    assert pairs[1].name == "train_scene/rgb_00001"
    checked, skipped = check_split(root, "test")
    assert [p.size for p in checked] == [(20, 30), (20, 30)] and skipped == []
    img, dep = read_pair(checked[0])  # type: ignore[misc]
    raw = cv2.imread(str(checked[0].depth), cv2.IMREAD_UNCHANGED)
    assert raw.dtype == np.uint16 and img.shape == (20, 30, 3) and img.dtype == np.uint8
    assert dep.dtype == np.float32 and np.allclose(dep, raw / 1000.0)
    assert 0.9 < dep.min() and dep.max() < 5.1  # metres


def test_spec_and_input_size() -> None:
    assert parse_spec("nyu:/a/b") == Path("/a/b")
    for bad in ("/a/b", "kitti:/a", "nyu:"):
        with pytest.raises(ConfigError):
            parse_spec(bad)
    assert input_size((480, 640), 0, 14) == (476, 644)
    assert input_size((120, 160), 0, 16) == (128, 160)
    assert input_size((120, 160), 64, 16) == (64, 80)
    assert input_size((480, 640), 224, 14) == (224, 294)
    assert input_size((5, 5), 0, 16) == (16, 16)


def _refused(root: Path, tmp_path: Path, needle: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as e:
        run(tiny_ctx(out), default_opts(f"nyu:{root}", epochs=1))
    assert needle in str(e.value)
    assert not (out / "depth_head.safetensors").exists()


def test_missing_list(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu")
    (root / "nyu_test.txt").unlink()
    _refused(root, tmp_path, str(root / "nyu_test.txt"))


def test_eight_bit_depth(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu")
    bad = root / "train_scene" / "sync_depth_00002.png"
    cv2.imwrite(str(bad), np.full((32, 40), 7, np.uint8))
    _refused(root, tmp_path, str(bad))


def test_size_mismatch(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu")
    bad = root / "test_scene" / "sync_depth_00001.png"
    cv2.imwrite(str(bad), np.full((16, 40), 2000, np.uint16))
    _refused(root, tmp_path, str(bad))


def test_missing_file(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu")
    gone = root / "train_scene" / "rgb_00001.png"
    gone.unlink()
    _refused(root, tmp_path, str(gone))


def test_bad_line(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu")
    with (root / "nyu_train.txt").open("a") as f:
        f.write("a.png b.png 1.0 extra\n")
    _refused(root, tmp_path, f"{root / 'nyu_train.txt'}:7")


def test_unreadable_image_skipped(tmp_path: Path) -> None:
    root = write_nyu(tmp_path / "nyu")
    (root / "train_scene" / "rgb_00003.png").write_bytes(b"not an image")
    pairs, skipped = check_split(root, "train")
    assert len(pairs) == 5 and skipped == ["train_scene/rgb_00003.png"]
    assert read_depth(root / "train_scene" / "sync_depth_00003.png").shape == (32, 40)
