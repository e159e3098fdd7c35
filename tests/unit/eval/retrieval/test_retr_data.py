"""Readers of the revisitop gnd pickle, a user's own set and Copydays, on tiny folders in the exact layouts;
refusals name the file."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from retr_helpers import GND, make_copydays, make_revisited, make_user_set, pattern, save_jpg

from fovea.errors import ConfigError
from fovea.eval.retrieval.data import load_copydays, load_retrieval


def test_gnd_pickle_loader(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    rs = load_retrieval(f"roxford5k:{root}")
    assert rs.kind == "roxford5k" and rs.revisited
    assert [p.name for p in rs.queries] == ["q_frame.jpg", "q_other.jpg", "q_copy4.jpg"]
    assert [p.name for p in rs.database] == [f"db_{i:02d}.jpg" for i in range(8)]
    assert all(p.parent == root / "roxford5k" / "jpg" for p in rs.queries + rs.database)
    assert rs.gnd[0] == {"easy": [2], "hard": [5], "junk": [6]} and rs.gnd[1]["easy"] == []
    assert rs.bbx[0] == GND[0]["bbx"]
    # DIR may also be the <name> folder itself
    assert load_retrieval(f"roxford5k:{root / 'roxford5k'}").database == rs.database


def test_missing_gnd_pickle_is_named(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data", name="rparis6k")
    with pytest.raises(ConfigError, match="gnd_roxford5k.pkl"):
        load_retrieval(f"roxford5k:{root}")  # the folder holds rparis6k only
    (root / "rparis6k" / "gnd_rparis6k.pkl").unlink()
    with pytest.raises(ConfigError, match=r"rparis6k/gnd_rparis6k\.pkl: missing"):
        load_retrieval(f"rparis6k:{root}")


def test_missing_image_is_named(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    (root / "roxford5k" / "jpg" / "db_05.jpg").unlink()
    with pytest.raises(ConfigError, match=r"db_05\.jpg: missing image \(listed in .*gnd_roxford5k\.pkl\)"):
        load_retrieval(f"roxford5k:{root}")


def test_bad_pickles_and_specs(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    pkl = root / "roxford5k" / "gnd_roxford5k.pkl"
    cfg = pickle.loads(pkl.read_bytes())
    cfg["gnd"][2]["hard"] = [99]
    pkl.write_bytes(pickle.dumps(cfg))
    with pytest.raises(ConfigError, match=r"gnd\[2\]\['hard'\] holds index 99"):
        load_retrieval(f"roxford5k:{root}")
    pkl.write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read the pickle"):
        load_retrieval(f"roxford5k:{root}")
    with pytest.raises(ConfigError, match="expected roxford5k:DIR"):
        load_retrieval(f"oxford:{root}")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_retrieval(f"roxford5k:{tmp_path / 'nowhere'}")


def test_user_set(tmp_path: Path) -> None:
    root = make_user_set(tmp_path / "mine")
    rs = load_retrieval(f"retrieval:{root}")
    assert not rs.revisited and [p.name for p in rs.queries] == ["a.jpg", "b.jpg"]
    assert rs.gnd == [{"ok": [1, 3], "junk": [2]}, {"ok": [], "junk": []}] and rs.bbx == [None, None]
    (root / "positives.csv").write_text("query,database\na.jpg,d9.jpg\n")
    with pytest.raises(ConfigError, match=r"positives\.csv: database image 'd9\.jpg' is not a file of"):
        load_retrieval(f"retrieval:{root}")
    (root / "positives.csv").unlink()
    with pytest.raises(ConfigError, match=r"positives\.csv: missing"):
        load_retrieval(f"retrieval:{root}")


def test_copydays_layout(tmp_path: Path) -> None:
    root = make_copydays(tmp_path / "cd")
    cd = load_copydays(f"copydays:{root}", ["strong"])
    assert [p.name for p in cd.originals] == ["000100.jpg", "000200.jpg", "000300.jpg"]
    assert [p.name for p in cd.queries] == ["000101.jpg", "000102.jpg", "000201.jpg", "000301.jpg"]
    assert cd.positive == [0, 0, 1, 2] and cd.blocks == ["strong"] * 4
    save_jpg(root / "strong" / "000901.jpg", pattern(1))
    with pytest.raises(ConfigError, match=r"000901\.jpg: no original 000900\.jpg"):
        load_copydays(f"copydays:{root}", ["strong"])
    with pytest.raises(ConfigError, match=r"crops/20: missing folder"):
        load_copydays(f"copydays:{root}", ["crops/20"])
