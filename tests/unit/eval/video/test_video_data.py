"""The DAVIS reader on tiny folders: listing, palettes, result PNGs, refusals that name the file."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from video_helpers import PALETTE, make_davis

from fovea.errors import ConfigError
from fovea.eval.video.data import (check_results, default_palette, load_davis, mask_palette, parse_spec, read_mask,
                                   write_mask)


def test_reader_lists_sequences_frames_objects(tmp_path):
    root = make_davis(tmp_path / "davis", {"alpha": 1, "beta": 2}, n_frames=4)
    seqs = load_davis(parse_spec(f"davis:{root}"), "val")
    assert [s.name for s in seqs] == ["alpha", "beta"]
    s = seqs[1]
    assert [f.name for f in s.frames] == ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"]
    assert [a.name for a in s.annotations] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert (s.height, s.width, s.n_objects) == (32, 56, 2) and seqs[0].n_objects == 1
    assert s.palette == PALETTE
    assert s.result_name(s.frames[2]) == "00002.png"


def test_palette_png_roundtrip(tmp_path):
    lab = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
    write_mask(tmp_path / "a" / "00000.png", lab, PALETTE)
    with Image.open(tmp_path / "a" / "00000.png") as im:
        assert im.mode == "P"
    assert (read_mask(tmp_path / "a" / "00000.png") == lab).all()
    assert mask_palette(tmp_path / "a" / "00000.png") == PALETTE
    write_mask(tmp_path / "b.png", lab, None)  # no input palette: DAVIS's
    assert mask_palette(tmp_path / "b.png") == default_palette()
    assert default_palette()[3:9] == (128, 0, 0, 0, 128, 0)  # objects 1, 2: dark red, dark green


def test_spec_of_another_kind_is_refused():
    with pytest.raises(ConfigError, match="davis"):
        parse_spec("roxford5k:/nowhere")


def test_missing_split_file_is_named(tmp_path):
    root = make_davis(tmp_path / "d")
    with pytest.raises(ConfigError, match="test-dev.txt"):
        load_davis(root, "test-dev")


def test_listed_sequence_missing_is_named(tmp_path):
    root = make_davis(tmp_path / "d")
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\ngamma\n")
    with pytest.raises(ConfigError, match=r"JPEGImages/480p/gamma"):
        load_davis(root, "val")


def test_sequence_without_first_mask_is_named(tmp_path):
    root = make_davis(tmp_path / "d")
    (root / "Annotations" / "480p" / "beta" / "00000.png").unlink()
    with pytest.raises(ConfigError, match=r"beta/00000.png.*first-frame mask"):
        load_davis(root, "val")


def test_unreadable_frame_is_named(tmp_path):
    root = make_davis(tmp_path / "d")
    (root / "JPEGImages" / "480p" / "alpha" / "00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ConfigError, match=r"alpha/00003.jpg: unreadable frame"):
        load_davis(root, "val")


def test_rgb_annotation_is_refused(tmp_path):
    root = make_davis(tmp_path / "d")
    p = root / "Annotations" / "480p" / "beta" / "00002.png"
    Image.fromarray(np.zeros((32, 56, 3), np.uint8)).save(p)
    with pytest.raises(ConfigError, match=r"beta/00002.png: .*palette"):
        load_davis(root, "val")


def test_frame_of_another_size_is_named(tmp_path):
    root = make_davis(tmp_path / "d")
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(root / "JPEGImages" / "480p" / "alpha" / "00001.jpg")
    with pytest.raises(ConfigError, match=r"alpha/00001.jpg: frame size 50x30"):
        load_davis(root, "val")


def test_first_mask_without_object_is_named(tmp_path):
    root = make_davis(tmp_path / "d")
    write_mask(root / "Annotations" / "480p" / "alpha" / "00000.png", np.zeros((32, 56), np.uint8), PALETTE)
    with pytest.raises(ConfigError, match=r"alpha/00000.png: .*no object"):
        load_davis(root, "val")


def test_missing_result_is_named(tmp_path):
    root = make_davis(tmp_path / "d", {"alpha": 1}, n_frames=3)
    seqs = load_davis(root, "val")
    pred = tmp_path / "pred"
    for a in seqs[0].annotations[:2]:
        write_mask(pred / "alpha" / a.name, read_mask(a), PALETTE)
    with pytest.raises(ConfigError, match=r"pred/alpha/00002.png: no result"):
        check_results(pred, seqs)
