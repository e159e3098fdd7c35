"""End-to-end ``run()`` of the video protocol with a tiny random ViT on a tiny DAVIS folder."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from video_helpers import PALETTE, make_davis

from fovea.errors import ConfigError
from fovea.eval.plugin import EvalContext
from fovea.eval.protocols import PAPER_PROTOCOLS
from fovea.eval.video.data import mask_palette, read_mask
from fovea.eval.video.metrics import region_similarity
from fovea.eval.video.propagate import first_labels, to_mask
from fovea.eval.video.protocol import PROTOCOL
from fovea.models.vit import ViTConfig, build_vit


def _opts(*argv: str) -> dict:
    p = argparse.ArgumentParser()
    for o in PROTOCOL.options:
        p.add_argument(f"--{o.flag}", dest=o.key, **o.kwargs)
    return vars(p.parse_args(list(argv)))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_vit(ViTConfig(arch="vit_tiny", depth=1, embed_dim=48, num_heads=3, patch_size=8, img_size=32)).eval()


def _ctx(vit, out):
    return EvalContext(vit, torch.device("cpu"), batch_size=4, progress=False, out_dir=out)


def test_protocol_is_registered():
    assert PAPER_PROTOCOLS["video"] == "fovea.eval.video.protocol"
    assert PROTOCOL.name == "video"
    assert {o.flag for o in PROTOCOL.options} >= {"data", "split", "n-last-frames", "topk", "radius", "temperature",
                                                  "short-side", "size-multiple", "features", "pictures", "score-only"}


def test_run_end_to_end_writes_davis_results_and_scores(tmp_path, vit):
    root = make_davis(tmp_path / "davis", {"alpha": 1, "beta": 2}, n_frames=5)
    out = tmp_path / "pred"
    r = PROTOCOL.run(_ctx(vit, out), _opts("--data", f"davis:{root}", "--short-side", "32", "--size-multiple", "8",
                                           "--pictures", "1"))
    for seq, n_obj in (("alpha", 1), ("beta", 2)):
        files = sorted(p.name for p in (out / seq).iterdir())
        assert files == [f"{t:05d}.png" for t in range(5)]
        given = read_mask(root / "Annotations" / "480p" / seq / "00000.png")
        assert (read_mask(out / seq / "00000.png") == given).all()  # frame 0 = the given mask
        assert mask_palette(out / seq / "00003.png") == PALETTE  # the input annotation's palette
        pred = read_mask(out / seq / "00004.png")
        assert pred.shape == (32, 56) and pred.max() <= n_obj
    assert set(r["per_object"]) == {"alpha_1", "beta_1", "beta_2"}
    for k in ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"):
        assert r[k] is not None
    assert 0 <= r["J-Mean"] <= 100 and 0 <= r["F-Mean"] <= 100
    assert r["J&F-Mean"] == pytest.approx((r["J-Mean"] + r["F-Mean"]) / 2, abs=1e-3)
    objs = r["per_object"].values()
    assert r["J-Mean"] == pytest.approx(np.mean([o["J-Mean"] for o in objs]), abs=1e-3)
    assert (r["n_sequences"], r["n_objects"], r["n_frames"], r["n_frames_propagated"]) == (2, 3, 10, 8)
    assert r["n_object_frames_scored"] == 3 * 3  # frames 1..3 of each object
    assert r["input_sizes"] == {"alpha": [32, 56], "beta": [32, 56]}
    assert len(r["pictures"]) == 1 and (out / "video_alpha.png").is_file()
    json.dumps(r, allow_nan=False)
    assert PROTOCOL.headline(r)["J&F-Mean"] == r["J&F-Mean"]
    assert any("J&F-Mean" in ln for ln in PROTOCOL.markdown(r)) and PROTOCOL.summary(r)

    # --score-only rescoring the same results gives the same figures
    again = PROTOCOL.run(_ctx(vit, out), _opts("--data", str(root), "--short-side", "32", "--size-multiple", "8",
                                               "--pictures", "0", "--score-only"))
    assert again["per_object"] == r["per_object"] and again["n_frames_propagated"] == 0


def test_score_only_on_the_ground_truth_is_perfect(tmp_path, vit):
    root = make_davis(tmp_path / "davis", {"alpha": 1, "beta": 2}, n_frames=6)
    out = tmp_path / "pred"
    shutil.copytree(root / "Annotations" / "480p", out)
    r = PROTOCOL.run(_ctx(vit, out), _opts("--data", f"davis:{root}", "--score-only", "--pictures", "0"))
    assert r["J&F-Mean"] == 100.0 and r["J-Recall"] == 100.0 and r["F-Decay"] == 0.0
    (out / "beta" / "00004.png").unlink()
    with pytest.raises(ConfigError, match=r"beta/00004.png"):
        PROTOCOL.run(_ctx(vit, out), _opts("--data", f"davis:{root}", "--score-only"))


def test_pixel_features_on_a_still_sequence_copy_the_first_mask(tmp_path, vit):
    # every frame a copy of frame 0: each patch's own copy dominates its top-5 (cos 1 against the others'
    # < 1 at T = 0.1), so every frame's result is the first mask taken to the patch grid and back
    root = make_davis(tmp_path / "davis", {"alpha": 1}, n_frames=4)
    for t in range(1, 4):
        for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
            d = root / sub / "480p" / "alpha"
            shutil.copy(d / f"00000.{ext}", d / f"{t:05d}.{ext}")
    r = PROTOCOL.run(_ctx(vit, tmp_path / "pred"), _opts("--data", f"davis:{root}", "--short-side", "32",
                                                         "--size-multiple", "8", "--features", "pixels",
                                                         "--pictures", "0"))
    assert r["settings"]["features"] == "pixels"
    m0 = read_mask(root / "Annotations" / "480p" / "alpha" / "00000.png")
    grid = to_mask(first_labels(m0, (32, 56), 8, 2), 8, 32, 56)
    expect = 100 * region_similarity(m0 == 1, grid == 1)[0]
    assert 0 < expect < 100
    assert r["J-Mean"] == pytest.approx(expect, abs=0.5)
    assert (read_mask(tmp_path / "pred" / "alpha" / "00002.png") == grid).mean() > 0.99


@pytest.mark.parametrize("argv,match", [(["--short-side", "36"], "short-side 36"),
                                        (["--size-multiple", "12"], "size-multiple 12"),
                                        (["--topk", "0"], "topk"), (["--temperature", "0"], "temperature")])
def test_bad_options_refused_before_any_work(tmp_path, vit, argv, match):
    root = make_davis(tmp_path / "davis", {"alpha": 1}, n_frames=3)
    out = tmp_path / "pred"
    with pytest.raises(ConfigError, match=match):
        PROTOCOL.run(_ctx(vit, out), _opts("--data", f"davis:{root}", *argv))
    assert not out.exists() or not any(out.iterdir())


def test_unreadable_frame_refused_before_any_result(tmp_path, vit):
    root = make_davis(tmp_path / "davis", {"alpha": 1, "beta": 1}, n_frames=3)
    (root / "JPEGImages" / "480p" / "beta" / "00002.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred"
    with pytest.raises(ConfigError, match=r"beta/00002.jpg"):
        PROTOCOL.run(_ctx(vit, out), _opts("--data", f"davis:{root}", "--short-side", "32", "--size-multiple", "8"))
    assert not (out / "alpha").exists()  # nothing propagated for the good sequence either
