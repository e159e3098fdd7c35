"""The SPair reader on a tiny folder, and its refusals naming the bad file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from corr_helpers import make_spair, write_pair

from fovea.errors import ConfigError
from fovea.eval.correspondence.data import parse_spec, read_spair


def test_reader_on_a_tiny_spair_folder(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    pairs = read_spair(root, "test")
    assert [(p.category, p.name) for p in pairs] == [("cat", "000001-a-a:cat"), ("cat", "000002-a-a2:cat"),
                                                    ("dog", "000003-b-b:dog")]
    p = pairs[1]
    assert p.src_path == root / "JPEGImages" / "cat" / "a.jpg" and p.trg_path == root / "JPEGImages" / "cat" / "a2.jpg"
    assert p.src_kps.shape == (9, 2) and p.n_kps == 9 and pairs[2].n_kps == 4
    np.testing.assert_allclose(p.trg_kps, 2 * p.src_kps + 0.5)
    assert p.trg_bbox.tolist() == [0, 0, 47, 79]
    assert parse_spec(f"spair:{root}") == root and parse_spec(str(root)) == root


def test_split_folder_and_spec(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    with pytest.raises(ConfigError, match="PairAnnotation/trn"):
        read_spair(root, "trn")
    with pytest.raises(ConfigError, match="roxford5k"):
        parse_spec("roxford5k:/nowhere")
    with pytest.raises(ConfigError, match="does not exist"):
        read_spair(tmp_path / "nope")
    # a split folder of its own is read from PairAnnotation/<split>/
    f = root / "PairAnnotation" / "test" / "000003-b-b:dog.json"
    write_pair(root, "v1", json.loads(f.read_text()), split="val")
    assert [p.name for p in read_spair(root, "val")] == ["v1"]


def _good(root: Path) -> dict:
    return json.loads((root / "PairAnnotation" / "test" / "000001-a-a:cat.json").read_text())


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("src_kps"), "no 'src_kps'"),
    (lambda d: d.update(trg_kps=[]), "'trg_kps' has no keypoints"),
    (lambda d: d.update(trg_kps=d["trg_kps"][:-1]), "9 source keypoints but 8 target keypoints"),
    (lambda d: d.update(src_kps=[[1, "a"]] * 9), "not a list of"),
    (lambda d: d.pop("trg_bndbox"), "no 'trg_bndbox'"),
    (lambda d: d.update(src_bndbox=[0, 0, 10]), "'src_bndbox' is not"),
    (lambda d: d.update(trg_bndbox=[5, 0, 5, 10]), "is empty"),
    (lambda d: d.update(trg_imname="missing.jpg"), "missing.jpg"),
    (lambda d: d.pop("category"), "no 'category'"),
])
def test_bad_pair_files_are_refused_naming_the_file(tmp_path: Path, change, message: str) -> None:
    root = make_spair(tmp_path / "spair")
    d = _good(root)
    change(d)
    bad = write_pair(root, "000009-bad:cat", d)
    with pytest.raises(ConfigError) as e:
        read_spair(root)
    assert str(bad) in str(e.value) and message in str(e.value)


def test_unparseable_json_and_empty_folder_are_refused(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    bad = root / "PairAnnotation" / "test" / "zz.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="zz.json"):
        read_spair(root)
    empty = tmp_path / "empty"
    (empty / "PairAnnotation" / "test").mkdir(parents=True)
    (empty / "JPEGImages").mkdir()
    with pytest.raises(ConfigError, match="no pair JSON"):
        read_spair(empty)
