"""WebDataset tar shards (``data.train.kind=webdataset``): brace notation, labels from .cls / .json in either
member order, reading by index equal to the source they were written from, the index cache, workers."""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fovea.data.sources import SourceConfig, build_source
from fovea.data.tarshards import expand_braces, shard_paths, write_shards


def test_brace_notation() -> None:
    assert expand_braces("s/train-{000..003}.tar") == [f"s/train-00{i}.tar" for i in range(4)]
    assert expand_braces("a{1..3}b") == ["a1b", "a2b", "a3b"]
    assert expand_braces("{x,y}-{08..10}") == ["x-08", "x-09", "x-10", "y-08", "y-09", "y-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shards_written_from_a_folder_read_back_the_same(folder: Path, tmp_path: Path) -> None:
    src = build_source(SourceConfig(kind="folder", path=str(folder)))
    paths = write_shards(src, str(tmp_path / "sh"), per_shard=20, progress=False)
    assert [Path(p).name for p in paths] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    wds = build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "sh" / "train-{00000..00002}.tar")))
    assert len(wds) == len(src) == 48 and np.array_equal(wds.labels, src.labels)
    for i in (0, 19, 20, 47):
        assert np.array_equal(wds.load(i), src.load(i))
    assert list(wds.shard[[0, 19, 20, 47]]) == [0, 0, 1, 2]
    # the same shards by directory and by glob; the index cache beside each shard is not a shard
    assert (tmp_path / "sh" / "train-00001.tar.fovea-idx.npz").exists()
    for path in (str(tmp_path / "sh"), str(tmp_path / "sh" / "train-*")):
        again = build_source(SourceConfig(kind="webdataset", path=path))
        assert len(again) == 48 and np.array_equal(again.offset, wds.offset)
    clone = pickle.loads(pickle.dumps(wds))  # what a data-loader worker gets: arrays, no open files
    assert clone._files == {} and np.array_equal(clone.load(30), src.load(30))
    sub = build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "sh"), limit=7, seed=1))
    assert len(sub) == 7


def test_labels_from_cls_and_json_in_any_order(tmp_path: Path) -> None:
    _tar(tmp_path / "a.tar", [("x/s1.png", _png(10)), ("x/s1.cls", b"3\n"),
                              ("x/s2.json", json.dumps({"label": 5}).encode()), ("x/s2.jpg.png", _png(20)),
                              ("x/s3.png", _png(30)), ("x/s3.txt", b"a caption"),
                              ("x/s4.json", b"{not json"), ("x/s4.png", _png(40))])
    src = build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "a.tar")))
    assert len(src) == 4 and src.labels.tolist() == [3, 5, -1, -1]
    assert [int(src.load(i)[0, 0, 0]) for i in range(4)] == [10, 20, 30, 40]


def test_bad_shards_are_named(tmp_path: Path) -> None:
    _tar(tmp_path / "ok-0.tar", [("a.png", _png(1))])
    with pytest.raises(FileNotFoundError, match="1 of 2 shards do not exist"):
        shard_paths(str(tmp_path / "ok-{0..1}.tar"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="junk.tar"):
        build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "junk.tar")))
    _tar(tmp_path / "empty.tar", [("a.txt", b"x")])
    with pytest.raises(ValueError, match="no images"):
        build_source(SourceConfig(kind="webdataset", path=str(tmp_path / "empty.tar")))
