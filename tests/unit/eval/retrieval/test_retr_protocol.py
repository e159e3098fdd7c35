"""End-to-end ``run()`` of retrieval and copydetect with a tiny random ViT and the raw-pixel baseline:
the --save-ranks file (shape, content, re-scored from itself), query crop, unreadable images, a user's set,
copy detection with distractors and whitening, pictures, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from retr_helpers import make_copydays, make_revisited, make_user_set, tiny_ctx

from fovea.errors import ConfigError
from fovea.eval.protocols import PAPER_PROTOCOLS
from fovea.eval.retrieval.copydetect import PROTOCOL as COPY
from fovea.eval.retrieval.metrics import compute_map, revisited_setups
from fovea.eval.retrieval.protocol import PROTOCOL


def _opts(proto, data: str, **kw: object) -> dict:  # type: ignore[no-untyped-def]
    o = {opt.key: opt.kwargs.get("default") for opt in proto.options}
    o.update({"data": data, "multiscale": False, **kw})
    return o


def test_registered_with_the_issue_options() -> None:
    assert PAPER_PROTOCOLS["retrieval"] == "fovea.eval.retrieval.protocol"
    assert PAPER_PROTOCOLS["copydetect"] == "fovea.eval.retrieval.copydetect"
    assert {"data", "descriptor", "gem-p", "imsize", "multiscale", "query-crop", "save-ranks", "features",
            "pictures"} <= {o.flag for o in PROTOCOL.options}
    assert {"data", "distractors", "whiten", "imsize", "features", "pictures"} <= {o.flag for o in COPY.options}


def test_retrieval_run_tiny_vit_and_save_ranks(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    ranks_file = tmp_path / "r" / "ranks.npy"
    r = PROTOCOL.run(tiny_ctx(tmp_path / "out"), _opts(PROTOCOL, f"roxford5k:{root}", imsize=32, descriptor="gem",
                                                      multiscale=True, save_ranks=str(ranks_file), pictures=2))
    for s in ("easy", "medium", "hard"):
        assert set(r[s]) >= {"mAP", "mP@1", "mP@5", "mP@10"} and 0 <= r[s]["mAP"] <= 100
    assert r["easy"]["n_queries"] == 2 and r["easy"]["n_without_positives"] == 1  # query 1 has no positive
    ranks = np.load(ranks_file)
    assert r["ranks"] == str(ranks_file.resolve())
    assert ranks.shape == (8, 3) and ranks.dtype.kind == "i"
    assert all(sorted(ranks[:, q].tolist()) == list(range(8)) for q in range(3))  # permutations of imlist
    # revisitop's compute_map on the saved ranks gives the reported numbers
    gnd = revisited_setups([{"easy": [2], "hard": [5], "junk": [6]}, {"easy": [], "hard": [], "junk": [1]},
                            {"easy": [0], "hard": [4], "junk": []}])
    for s in ("easy", "medium", "hard"):
        assert r[s]["mAP"] == pytest.approx(round(100 * compute_map(ranks, gnd[s])["mAP"], 2))
    assert r["settings"]["descriptor"] == "gem" and r["settings"]["multiscale"] is True
    assert len(r["pictures"]) == 1 and Path(r["pictures"][0]).stat().st_size > 0
    json.dumps(r)
    assert PROTOCOL.headline(r)["medium/mAP"] == r["medium"]["mAP"]
    assert any("| medium |" in ln for ln in PROTOCOL.markdown(r)) and PROTOCOL.summary(r)


def test_pixels_find_the_copies_and_query_crop_matters(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    ctx = tiny_ctx(tmp_path / "out")
    r = PROTOCOL.run(ctx, _opts(PROTOCOL, f"roxford5k:{root}", features="pixels", pixel_size=8, pictures=0))
    ranks = np.load(r["ranks"])
    assert Path(r["ranks"]) == (tmp_path / "out" / "ranks.npy").resolve()  # the default
    assert ranks[0, 0] == 2 and ranks[0, 2] == 4  # query 0 cropped to its bbx = image 2; query 2 = image 4
    assert r["medium"]["mP@1"] == 100.0  # both tops are Medium positives (2 for query 0, 4 for query 2)
    r2 = PROTOCOL.run(ctx, _opts(PROTOCOL, f"roxford5k:{root}", features="pixels", pixel_size=8, pictures=0,
                                 query_crop="false"))
    assert np.load(r2["ranks"])[0, 0] != 2 and r2["settings"]["query_crop"] is False  # the frame hides it


def test_unreadable_database_image_is_ranked_last_and_counted(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    (root / "roxford5k" / "jpg" / "db_03.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    r = PROTOCOL.run(tiny_ctx(tmp_path / "out"), _opts(PROTOCOL, f"roxford5k:{root}", imsize=32, pictures=1))
    assert r["skipped"]["database"] == 1 and r["skipped"]["files"][0].endswith("db_03.jpg")
    ranks = np.load(r["ranks"])
    assert ranks.shape == (8, 3) and (ranks[-1] == 3).all()


def test_refusals_name_the_file(tmp_path: Path) -> None:
    root = make_revisited(tmp_path / "data")
    ctx = tiny_ctx(tmp_path / "out")
    (root / "roxford5k" / "jpg" / "q_other.jpg").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"q_other\.jpg: unreadable query image"):
        PROTOCOL.run(ctx, _opts(PROTOCOL, f"roxford5k:{root}", imsize=32))
    (root / "roxford5k" / "gnd_roxford5k.pkl").unlink()
    with pytest.raises(ConfigError, match="gnd_roxford5k.pkl"):
        PROTOCOL.run(ctx, _opts(PROTOCOL, f"roxford5k:{root}"))
    with pytest.raises(ConfigError, match="--imsize"):
        PROTOCOL.run(ctx, _opts(PROTOCOL, f"roxford5k:{root}", imsize=0))


def test_user_set_reports_one_setup_under_medium(tmp_path: Path) -> None:
    root = make_user_set(tmp_path / "mine")
    r = PROTOCOL.run(tiny_ctx(tmp_path / "out"), _opts(PROTOCOL, f"retrieval:{root}", features="pixels", pictures=1))
    assert "easy" not in r and "hard" not in r and r["set"] == "retrieval"
    # query a = copy of d1 (positive, first); d3 the other positive somewhere among d0, d3, d4 (d2 junk)
    assert r["medium"]["n_queries"] == 1 and r["medium"]["n_without_positives"] == 1
    assert r["medium"]["mP@1"] == 100.0 and np.load(r["ranks"]).shape == (5, 2)


def test_copydetect_pixels_distractors_whitening(tmp_path: Path) -> None:
    root = make_copydays(tmp_path / "cd", distractors=3)
    (root / "distractors" / "x1.jpg").write_bytes(b"broken")
    ctx = tiny_ctx(tmp_path / "out")
    r = COPY.run(ctx, _opts(COPY, f"copydays:{root}", features="pixels", pixel_size=8, pictures=2))
    assert (r["n_queries"], r["n_originals"], r["n_distractors"]) == (4, 3, 3)
    assert r["skipped"]["distractors"] == 1 and r["mAP"] == 100.0 and r["top1"] == 100.0
    assert r["settings"]["distractors"] == str(root / "distractors")
    ranks = np.load(r["ranks"])
    assert ranks.shape == (6, 4) and ranks[0].tolist() == [0, 0, 1, 2] and (ranks[-1] == 4).all()
    g = json.loads(Path(r["gnd"]).read_text())
    assert g["positive"] == [0, 0, 1, 2] and g["database"][3].endswith("x0.jpg")
    assert len(r["pictures"]) == 1 and Path(r["pictures"][0]).exists()
    # the backbone descriptor (CLS + GeM p=4), no distractors, whitening learned on another folder
    r = COPY.run(ctx, _opts(COPY, f"copydays:{root}", imsize=32, distractors="none", whiten=str(root / "original"),
                            pictures=0))
    assert r["n_distractors"] == 0 and r["n_whiten"] == 3 and 0 < r["mAP"] <= 100
    assert COPY.headline(r)["mAP"] == r["mAP"] and COPY.summary(r) and COPY.markdown(r)
    json.dumps(r)


def test_copydetect_refusals(tmp_path: Path) -> None:
    root = make_copydays(tmp_path / "cd")
    ctx = tiny_ctx(tmp_path / "out")
    with pytest.raises(ConfigError, match="--distractors"):
        COPY.run(ctx, _opts(COPY, f"copydays:{root}", distractors="folder:" + str(tmp_path / "nope")))
    (root / "original" / "000200.jpg").unlink()
    with pytest.raises(ConfigError, match=r"000201\.jpg: no original 000200\.jpg"):
        COPY.run(ctx, _opts(COPY, f"copydays:{root}"))
