"""End-to-end ``run()`` of the correspondence protocol: tiny random ViT, raw-pixel known answers, the
matches file (re-scored from its own content), pictures, skipped unreadable images, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from corr_helpers import make_spair
from PIL import Image

from fovea.errors import ConfigError
from fovea.eval.correspondence.protocol import PROTOCOL
from fovea.eval.plugin import EvalContext
from fovea.eval.protocols import PAPER_PROTOCOLS
from fovea.models.vit import ViTConfig, build_vit


def _ctx(out: Path) -> EvalContext:
    torch.manual_seed(0)
    vit = build_vit(ViTConfig(arch="vit_tiny", depth=1, embed_dim=48, num_heads=3, patch_size=8, img_size=32))
    return EvalContext(vit.eval(), torch.device("cpu"), batch_size=2, progress=False, out_dir=out)


def _opts(root: Path, **kw: object) -> dict:
    o = {o.key: o.kwargs.get("default") for o in PROTOCOL.options}
    o.update({"data": f"spair:{root}", "size": 32, **kw})
    return o


def test_registered_and_options_declared() -> None:
    assert PAPER_PROTOCOLS["correspondence"] == "fovea.eval.correspondence.protocol"
    flags = {o.flag for o in PROTOCOL.options}
    assert {"data", "split", "size", "alpha", "resolution", "features", "save-matches", "pictures"} <= flags


def test_run_with_a_tiny_vit_and_the_matches_file(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    r = PROTOCOL.run(_ctx(tmp_path / "out"), _opts(root))
    assert [k for k in r if k.startswith("pck@")] == ["pck@0.05", "pck@0.1", "pck@0.15"]
    assert (r["n_pairs"], r["n_keypoints"], r["n_categories"], r["n_images"]) == (3, 22, 2, 4)
    assert r["skipped"] == {"pairs": 0, "images": 0, "files": []}
    for k in ("pck@0.05", "pck@0.1", "pck@0.15"):
        assert set(r[k]["per_category"]) == {"cat", "dog"}
        assert 0 <= r[k]["per_keypoint"] <= 100 and 0 <= r[k]["per_image"] <= 100
    assert r["pck@0.05"]["per_keypoint"] <= r["pck@0.1"]["per_keypoint"] <= r["pck@0.15"]["per_keypoint"]
    assert r["settings"]["size"] == 32 and r["settings"]["resolution"] == "pixel" and r["seconds"]["total"] > 0
    json.dumps(r)  # JSON-able
    # the matches file: enough for an external evaluator to re-score everything
    m = json.loads(Path(r["matches"]).read_text())
    assert Path(r["matches"]) == (tmp_path / "out" / "matches.json").resolve()
    assert [e["pair"] for e in m["pairs"]] == ["000001-a-a:cat", "000002-a-a2:cat", "000003-b-b:dog"]
    e = m["pairs"][1]
    assert (e["src_imname"], e["trg_imname"], e["trg_imsize"]) == ("a.jpg", "a2.jpg", [48, 80])
    assert len(e["src_kps"]) == len(e["pred_kps"]) == len(e["trg_kps"]) == 9
    assert e["trg_kps"][0] == [10.5, 12.5]  # 2 * (5, 6) + 0.5, original target pixels
    assert e["thresholds"]["0.1"] == pytest.approx(0.1 * 79) and e["bbox_max_side"] == 79
    pred = np.asarray(e["pred_kps"])
    assert (pred >= -0.5).all() and (pred[:, 0] <= 47.5).all() and (pred[:, 1] <= 79.5).all()
    # predicted points are centres of the 32 x 32 matching grid mapped back to 48 x 80 (pixel centres)
    np.testing.assert_allclose(((pred + 0.5) * [32 / 48, 32 / 80] - 0.5) % 1, 0, atol=1e-3)
    for a in ("0.05", "0.1", "0.15"):
        hits, tot, fr = 0, 0, []
        for p in m["pairs"]:
            d = np.linalg.norm(np.asarray(p["pred_kps"]) - np.asarray(p["trg_kps"]), axis=1)
            ok = d < p["thresholds"][a]
            assert ok.tolist() == p["correct"][a]
            hits, tot, fr = hits + ok.sum(), tot + len(ok), fr + [ok.mean()]
        assert r[f"pck@{a}"]["per_keypoint"] == pytest.approx(100 * hits / tot, abs=1e-9)
        assert r[f"pck@{a}"]["per_image"] == pytest.approx(100 * np.mean(fr), abs=1e-9)
    # pictures: default 4, only 3 pairs
    assert len(r["pictures"]) == 3 and all(Path(p).is_absolute() and Image.open(p).size[1] == 256 for p in r["pictures"])
    md = "\n".join(PROTOCOL.markdown(r))
    assert "pck@0.1" in md and "| cat |" in md and r["pictures"][0] in md
    assert set(PROTOCOL.headline(r)) == {f"pck@{a}/{k}" for a in ("0.05", "0.1", "0.15") for k in ("per_keypoint", "per_image")}
    assert "per keypoint" in PROTOCOL.summary(r)[0]


def test_raw_pixels_find_copies_exactly(tmp_path: Path) -> None:
    # identity copies and a x2 upsampled (48 x 80) copy of a non-square 24 x 40 image: the pixel baseline
    # finds every keypoint, which needs the original <-> resized mapping right on both sides
    root = make_spair(tmp_path / "spair")
    out = tmp_path / "m.json"
    r = PROTOCOL.run(_ctx(tmp_path / "out"), _opts(root, features="pixels", size=24, pixel_window=5, pictures=0,
                                                   save_matches=str(out), alpha="0.05"))
    assert list(k for k in r if k.startswith("pck@")) == ["pck@0.05"]
    assert r["pck@0.05"]["per_keypoint"] == 100.0 and r["pck@0.05"]["per_image"] == 100.0
    assert r["pictures"] == [] and not (tmp_path / "out" / "correspondence").exists()
    m = json.loads(out.read_text())
    err = [np.abs(np.asarray(p["pred_kps"]) - np.asarray(p["trg_kps"])).max(0) for p in m["pairs"]]
    assert max(e[0] for e in err) <= 1.0 + 1e-6 and max(e[1] for e in err) <= 80 / 48 + 1e-6  # half a cell of 24


def test_patch_resolution_and_max_pairs(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    r = PROTOCOL.run(_ctx(tmp_path / "out"), _opts(root, resolution="patch", max_pairs=2, pictures=1))
    assert r["n_pairs"] == 2 and set(r["pck@0.1"]["per_category"]) == {"cat", "dog"}  # spread over categories
    assert len(r["pictures"]) == 1
    m = json.loads(Path(r["matches"]).read_text())
    pred = np.asarray(m["pairs"][0]["pred_kps"])  # cell centres of the 4 x 4 patch grid in a 24 x 40 image
    np.testing.assert_allclose(((pred + 0.5) * [4 / 24, 4 / 40] - 0.5) % 1, 0, atol=1e-3)


def test_unreadable_image_skips_its_pairs_and_counts_them(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    bad = root / "JPEGImages" / "dog" / "b_copy.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    r = PROTOCOL.run(_ctx(tmp_path / "out"), _opts(root, pictures=0))
    assert r["skipped"] == {"pairs": 1, "images": 1, "files": [str(bad)]}
    assert r["n_pairs"] == 2 and list(r["pck@0.1"]["per_category"]) == ["cat"]


@pytest.mark.parametrize("kw,message", [({"size": 30}, "multiple of the patch size 8"), ({"alpha": "0.1,x"}, "--alpha"),
                                        ({"alpha": "1.5"}, "--alpha"), ({"pixel_window": 4}, "--pixel-window"),
                                        ({"data": "roxford5k:/x"}, "SPair")])
def test_bad_settings_refused_before_any_work(tmp_path: Path, kw: dict, message: str) -> None:
    root = make_spair(tmp_path / "spair")
    with pytest.raises(ConfigError, match=message):
        PROTOCOL.run(_ctx(tmp_path / "out"), _opts(root, **kw))
    assert not (tmp_path / "out").exists()


def test_bad_pair_refused_before_any_work(tmp_path: Path) -> None:
    root = make_spair(tmp_path / "spair")
    f = root / "PairAnnotation" / "test" / "000003-b-b:dog.json"
    d = json.loads(f.read_text())
    d["trg_kps"] = d["trg_kps"][:2]
    f.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="000003-b-b:dog.json"):
        PROTOCOL.run(_ctx(tmp_path / "out"), _opts(root))
    assert not (tmp_path / "out").exists()
