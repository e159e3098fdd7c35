"""Tests for fovea.data.sources / fovea.data.decode (all test images are generated here)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fovea.data import fmnist as fmnist_mod
from fovea.data.decode import FileSum, decode_image, read_idx
from fovea.data.sources import (
    FMNIST_CHECKSUMS, FashionMNISTSource, FolderSource, ParquetSource, SourceConfig,
    build_source, download_fmnist, fetch_with_replacement, probe_source,
)

from helpers import REPO  # noqa: E402
DATA = Path(os.environ.get("FOVEA_DATA", REPO.parent / "shared" / "data"))
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------- fixtures

def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _rgba() -> Image.Image:
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., :3] = (10, 20, 30)
    a[..., 3] = 255
    a[0, 0] = (10, 20, 30, 0)  # fully transparent -> must become white
    return Image.fromarray(a, "RGBA")


SIXTEEN = np.array([[65535, 32896, 0], [257, 65535, 0]], np.uint16)  # -> 255, 128, 0 / 1, 255, 0


def _sixteen_png() -> bytes:
    im = Image.fromarray(SIXTEEN)  # mode I;16
    assert im.mode.startswith("I;16")
    return _png(im)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


GOOD = {  # name -> bytes ; sorted order inside the class folder matters for the tests below
    "Photo.JPG": _jpeg(_noise(16, 24)),
    "cmyk.jpg": None,  # filled below
    "gray.png": _png(Image.fromarray(np.full((5, 7), 77, np.uint8), "L")),
    "rgba.png": _png(_rgba()),
    "sixteen.png": _sixteen_png(),
}
_cmyk = io.BytesIO()
Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(_cmyk, "JPEG", quality=95)  # pure red
GOOD["cmyk.jpg"] = _cmyk.getvalue()
_big = _jpeg(_noise(64, 64, 1))
BAD = {
    "empty.jpg": b"",
    "text.png": b"this is not an image\n",
    "tiny.png": _png(Image.new("RGB", (1, 1), (1, 2, 3))),
    "truncated.jpg": _big[: len(_big) // 2],
}


def _write(d: Path, files: dict[str, bytes]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    _write(root / "bad", BAD)  # class 0, items 0..3
    _write(root / "good", GOOD)  # class 1, items 4..8
    (root / "good" / "notes.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    return root


# -------------------------------------------------------------------------------- decoding

def test_decode_good_and_bad_images() -> None:
    for name, data in GOOD.items():
        img = decode_image(data)
        assert img is not None, name
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        assert img.flags["C_CONTIGUOUS"] and img.flags["WRITEABLE"], name
    for name, data in BAD.items():
        assert decode_image(data) is None, name
    assert decode_image(GOOD["Photo.JPG"]).shape == (16, 24, 3)
    assert decode_image(GOOD["gray.png"]).shape == (5, 7, 3)
    assert (decode_image(GOOD["gray.png"]) == 77).all()
    red = decode_image(GOOD["cmyk.jpg"]).astype(int)
    assert red.shape == (6, 8, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60


def test_decode_alpha_over_white_and_16bit() -> None:
    rgba = decode_image(GOOD["rgba.png"])
    assert rgba.shape == (4, 4, 3)
    assert rgba[0, 0].tolist() == [255, 255, 255]
    assert rgba[1, 1].tolist() == [10, 20, 30]
    s = decode_image(GOOD["sixteen.png"])
    assert s.shape == (2, 3, 3)
    assert s[0, 0].tolist() == [255] * 3 and s[0, 1].tolist() == [128] * 3
    assert s[:, :, 0].tolist() == [[255, 128, 0], [1, 255, 0]]
    pal = Image.new("P", (3, 3), 0)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    p = decode_image(_png(pal, transparency=0))
    assert p[0, 0].tolist() == [255, 255, 255] and p[1, 1].tolist() == [200, 0, 0]
    la = Image.fromarray(np.stack([np.full((2, 2), 9, np.uint8), np.zeros((2, 2), np.uint8)], -1),
                         "LA")
    assert (decode_image(_png(la)) == 255).all()


def test_decode_exif_orientation_and_min_side(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 8 wide x 4 high, shown 4 wide x 8 high
    data = _jpeg(_noise(4, 8), exif=exif.tobytes())
    assert decode_image(data).shape == (8, 4, 3)
    assert decode_image(_png(Image.new("L", (2, 2)))).shape == (2, 2, 3)  # 2 is kept
    assert decode_image(_png(Image.new("L", (5, 1)))) is None
    p = tmp_path / "x.png"
    p.write_bytes(GOOD["gray.png"])
    assert decode_image(str(p)).shape == (5, 7, 3) and decode_image(p).shape == (5, 7, 3)
    assert decode_image(str(tmp_path / "missing.png")) is None


def test_decompression_bomb_is_unreadable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert decode_image(_png(Image.new("L", (30, 30)))) is None  # > 2x limit -> error


# ---------------------------------------------------------------------------------- folder

def test_folder_classes_skips_and_replacement(class_folder: Path) -> None:
    src = build_source(SourceConfig(kind="folder", path=str(class_folder)))
    assert len(src) == 9 and src.class_names == ["bad", "good"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0] * 4 + [1] * 5
    assert [src.load(i) is None for i in range(9)] == [True] * 4 + [False] * 5
    img, used, skipped = fetch_with_replacement(src, 0)
    assert (used, skipped) == (4, 4) and img.shape == (16, 24, 3)
    img, used, skipped = fetch_with_replacement(src, 6)
    assert (used, skipped) == (6, 0)
    with pytest.raises(RuntimeError, match="classes"):
        fetch_with_replacement(src, 0, max_tries=3)
    probe_source(src)  # does not raise
    src2 = pickle.loads(pickle.dumps(src))
    assert src2.load(5).shape == (6, 8, 3)


def test_folder_flat_unlabelled_all_corrupt_and_empty(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    _write(flat, {"a.png": GOOD["gray.png"], "b.JPEG": GOOD["Photo.JPG"]})
    _write(flat / "nested", {"c.png": GOOD["rgba.png"]})
    src = build_source(SourceConfig(kind="folder", path=str(flat)))
    assert len(src) == 3 and src.labels.tolist() == [-1, -1, -1] and src.class_names == []
    corrupt = tmp_path / "all_corrupt"
    _write(corrupt, BAD)
    bad = build_source(SourceConfig(kind="folder", path=str(corrupt)))
    with pytest.raises(ValueError, match="no readable image in .*all_corrupt"):
        probe_source(bad)
    with pytest.raises(RuntimeError, match="all_corrupt"):
        fetch_with_replacement(bad, 2)
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"folder .*empty_dir contains no image files.*\.webp"):
        build_source(SourceConfig(kind="folder", path=str(empty)))
    with pytest.raises(FileNotFoundError, match="nope"):
        build_source(SourceConfig(kind="folder", path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="unknown source kind"):
        build_source(SourceConfig(kind="zip", path=str(flat)))


def test_limit_is_deterministic_subset(class_folder: Path) -> None:
    cfg = SourceConfig(kind="folder", path=str(class_folder), limit=4, seed=3)
    a, b = build_source(cfg), build_source(cfg)
    assert len(a) == 4 and a.indices.tolist() == b.indices.tolist()
    full = build_source(SourceConfig(kind="folder", path=str(class_folder)))
    assert a.labels.tolist() == full.labels[a.indices].tolist()
    assert a.class_names == full.class_names
    big = build_source(SourceConfig(kind="folder", path=str(class_folder), limit=100))
    assert len(big) == 9
    others = {tuple(build_source(SourceConfig(kind="folder", path=str(class_folder), limit=4,
                                              seed=s)).indices) for s in range(6)}
    assert len(others) > 1


# ------------------------------------------------------------------------------------- IDX

def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    head = bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def _write_fake_fmnist(d: Path, n: int, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labs = (np.arange(n) % 10).astype(np.uint8)
    d.mkdir(parents=True, exist_ok=True)
    for stem, arr in (("train-images-idx3-ubyte", imgs), ("train-labels-idx1-ubyte", labs)):
        data = _idx_bytes(arr)
        (d / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)
    return imgs, labs


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_and_fmnist_source(tmp_path: Path, gz: bool) -> None:
    imgs, labs = _write_fake_fmnist(tmp_path / "fm", 12, gz)
    suffix = ".gz" if gz else ""
    got = read_idx(tmp_path / "fm" / f"train-images-idx3-ubyte{suffix}", expect_magic=2051)
    assert got.dtype == np.uint8 and got.shape == (12, 28, 28) and (got == imgs).all()
    assert (read_idx(tmp_path / "fm" / f"train-labels-idx1-ubyte{suffix}") == labs).all()
    i32 = (np.arange(6) - 3).astype(">i4").reshape(2, 3)
    (tmp_path / "i32").write_bytes(_idx_bytes(i32))
    assert read_idx(tmp_path / "i32").tolist() == i32.tolist()
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "i32", expect_magic=2051)
    (tmp_path / "short").write_bytes(_idx_bytes(imgs)[:-5])
    with pytest.raises(ValueError, match="short"):
        read_idx(tmp_path / "short")
    src = build_source(SourceConfig(kind="fmnist", path=str(tmp_path / "fm")))
    assert isinstance(src, FashionMNISTSource) and len(src) == 12
    assert src.labels.dtype == np.int64 and src.labels.tolist() == labs.tolist()
    assert src.class_names[0] == "T-shirt/top" and src.class_names[9] == "Ankle boot"
    x = src.load(3)
    assert x.shape == (28, 28, 3) and x.flags["C_CONTIGUOUS"] and (x[..., 2] == imgs[3]).all()
    with pytest.raises(FileNotFoundError, match="lacks t10k"):
        build_source(SourceConfig(kind="fmnist", path=str(tmp_path / "fm"), split="test"))


def test_fmnist_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEA_FMNIST_DIR", str(tmp_path / "env"))
    monkeypatch.setattr(fmnist_mod, "FMNIST_DEFAULT_DIRS", (str(tmp_path / "a"), str(tmp_path / "b")))
    with pytest.raises(FileNotFoundError) as e:
        build_source(SourceConfig(kind="fmnist"))
    msg = str(e.value)
    for needle in ("apt-get install dataset-fashion-mnist", "path=", "fovea data download fmnist",
                   str(tmp_path / "env")):
        assert needle in msg
    _write_fake_fmnist(tmp_path / "env", 3, gz=True)
    assert len(build_source(SourceConfig(kind="fmnist"))) == 3


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason=f"{DEBIAN_FMNIST} absent "
                    "(apt-get install dataset-fashion-mnist); real Fashion-MNIST check skipped")
def test_real_fmnist() -> None:
    tr = build_source(SourceConfig(kind="fmnist", path=str(DEBIAN_FMNIST), split="train"))
    te = build_source(SourceConfig(kind="fmnist", path=str(DEBIAN_FMNIST), split="test"))
    assert len(tr) == 60000 and len(te) == 10000
    assert np.bincount(tr.labels, minlength=10).tolist() == [6000] * 10
    assert te.labels.min() == 0 and te.labels.max() == 9
    assert tr.load(0).shape == (28, 28, 3)


# -------------------------------------------------------------------------------- download

def test_download_verifies_checksums(tmp_path: Path) -> None:
    served = tmp_path / "served"
    files = {"a.gz": gzip.compress(b"alpha" * 50), "b.gz": gzip.compress(b"beta" * 50)}
    _write(served, files)
    sums = {n: FileSum(hashlib.md5(d).hexdigest(), hashlib.sha256(d).hexdigest(),
                       hashlib.sha256(gzip.decompress(d)).hexdigest()) for n, d in files.items()}
    out = download_fmnist(str(tmp_path / "dest"), base_url=served.as_uri(), checksums=sums)
    assert sorted(os.listdir(out)) == ["a.gz", "b.gz"]
    (served / "b.gz").write_bytes(gzip.compress(b"evil" * 50))
    dest2 = tmp_path / "dest2"
    with pytest.raises(ValueError, match="checksum mismatch .*b.gz"):
        download_fmnist(str(dest2), base_url=served.as_uri(), checksums=sums)
    assert sorted(os.listdir(dest2)) == ["a.gz"]  # no partial / temp file left behind
    (served / "b.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a valid gzip"):
        download_fmnist(str(dest2), base_url=served.as_uri(), checksums=sums)


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason=f"{DEBIAN_FMNIST} absent; "
                    "download check against the real checksums skipped")
def test_download_real_checksums_from_local_copy(tmp_path: Path) -> None:
    out = download_fmnist(str(tmp_path / "fm"), base_url=DEBIAN_FMNIST.as_uri())
    assert sorted(os.listdir(out)) == sorted(FMNIST_CHECKSUMS)
    assert len(build_source(SourceConfig(kind="fmnist", path=out, split="test"))) == 10000
    served = tmp_path / "corrupt"
    served.mkdir()
    name = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress((DEBIAN_FMNIST / name).read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one wrong label
    (served / name).write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_fmnist(str(tmp_path / "d2"), base_url=served.as_uri(),
                        checksums={name: FMNIST_CHECKSUMS[name]})
    assert os.listdir(tmp_path / "d2") == []


# --------------------------------------------------------------------------------- parquet

def _hf_parquet(path: Path, blobs: list[bytes], labels: list[int] | None,
                names: list[str] | None, row_group_size: int = 2) -> None:
    image = pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(blobs)],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    cols = {"image": image}
    if labels is not None:
        cols["label"] = pa.array(labels, pa.int64())
    table = pa.table(cols)
    if names is not None:
        feats = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": feats}})})
    pq.write_table(table, path, row_group_size=row_group_size)


def _solid_png(v: int) -> bytes:
    return _png(Image.new("RGB", (3, 4), (v, v + 1, v + 2)))


def test_parquet_source(tmp_path: Path) -> None:
    blobs = [_solid_png(10 * i) for i in range(5)]
    blobs[3] = b"corrupt"
    p = tmp_path / "tiny.parquet"
    _hf_parquet(p, blobs, [0, 1, 2, 1, 0], ["cat", "dog", "bird"])
    src = ParquetSource(str(p), cache_bytes=1)  # forces eviction: one group cached at a time
    assert len(src) == 5 and src.class_names == ["cat", "dog", "bird"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 1, 2, 1, 0]
    for i in (4, 0, 2, 1, 0):
        x = src.load(i)
        assert x.shape == (4, 3, 3) and x[0, 0].tolist() == [10 * i, 10 * i + 1, 10 * i + 2]
    assert src.load(3) is None and len(src._cache) == 1
    assert fetch_with_replacement(src, 3)[1:] == (4, 1)
    src2 = pickle.loads(pickle.dumps(src))  # as DataLoader workers receive it
    assert src2._pf is None and src2.load(1)[0, 0].tolist() == [10, 11, 12]
    with pytest.raises(IndexError):
        src.load(5)
    sub = build_source(SourceConfig(kind="parquet", path=str(p), limit=2, seed=1))
    assert len(sub) == 2 and sub.class_names == src.class_names
    q = tmp_path / "unlabelled.parquet"
    _hf_parquet(q, blobs[:2], None, None)
    u = build_source(SourceConfig(kind="parquet", path=str(q)))
    assert u.labels.tolist() == [-1, -1] and u.class_names == []
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        build_source(SourceConfig(kind="parquet", path=str(tmp_path / "missing.parquet")))
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="other.parquet.*image"):
        build_source(SourceConfig(kind="parquet", path=str(tmp_path / "other.parquet")))


def _child_load(src: ParquetSource, q: "mp.Queue[object]") -> None:
    q.put(src.load(0)[0, 0].tolist())


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method only tested on Linux")
def test_folder_paths_take_no_object_per_file(tmp_path: Path) -> None:
    from fovea.data.sources import PathList
    names = [str(tmp_path / f"d/{i:03d}-é.png") for i in range(5)]
    pl = PathList(names)
    assert len(pl) == 5 and list(pl) == names and pl[-1] == names[-1] and pl[1:3] == names[1:3]
    assert pl._blob.dtype == np.uint8 and pl._off.tolist()[-1] == sum(len(n.encode()) for n in names)
    clone = pickle.loads(pickle.dumps(pl))  # two arrays travel to the workers, not a list of strings
    assert clone[2] == names[2]
    with pytest.raises(IndexError):
        pl[5]


def test_parquet_shards_by_directory_and_glob(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    d.mkdir()
    for k in range(3):  # shard k holds images 10k .. 10k + 3 (values tell them apart)
        _hf_parquet(d / f"train-{k:05d}.parquet", [_solid_png(10 * k + j) for j in range(4)], [k] * 4, ["a", "b", "c"])
    (d / "notes.txt").write_text("not a shard")
    for path in (str(d), str(d / "train-*.parquet"), str(d / "train-0000[0-2].parquet")):
        src = build_source(SourceConfig(kind="parquet", path=path))
        assert len(src) == 12 and src.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert src.class_names == ["a", "b", "c"] and "3 files" in src.name
        assert [int(src.load(i)[0, 0, 0]) for i in (0, 5, 11)] == [0, 11, 23]
    src.max_open = 1  # one shard open at a time: reading another releases the last one's file and cache
    src.load(0)
    src.load(4)
    assert src.parts[0]._pf is None and not src.parts[0]._cache and src.parts[1]._pf is not None
    clone = pickle.loads(pickle.dumps(src))
    assert int(clone.load(9)[0, 0, 0]) == 21
    sub = build_source(SourceConfig(kind="parquet", path=str(d), limit=5, seed=0))
    assert len(sub) == 5
    with pytest.raises(FileNotFoundError, match="matches no file"):
        build_source(SourceConfig(kind="parquet", path=str(d / "val-*.parquet")))
    with pytest.raises(FileNotFoundError, match="no \\*.parquet"):
        build_source(SourceConfig(kind="parquet", path=str(tmp_path)))


def test_parquet_in_forked_worker(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    _hf_parquet(p, [_solid_png(7), _solid_png(9)], [0, 1], ["a", "b"])
    src = ParquetSource(str(p))
    assert src.load(1) is not None  # parent has an open file and a warm cache
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_load, args=(src, q))
    proc.start()
    try:
        assert q.get(timeout=20) == [7, 8, 9]
    finally:
        proc.join(timeout=20)
    assert proc.exitcode == 0


CIFAR_TEST = DATA / "cifar10" / "test.parquet"


@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason=f"{CIFAR_TEST} absent (set FOVEA_DATA to "
                    "the shared data folder); real CIFAR-10 parquet check skipped")
def test_real_cifar10_parquet() -> None:
    src = build_source(SourceConfig(kind="parquet", path=str(CIFAR_TEST)))
    assert len(src) == 10000 and len(src.class_names) == 10 and src.class_names[0] == "airplane"
    assert np.bincount(src.labels, minlength=10).tolist() == [1000] * 10
    x = src.load(1234)
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    probe_source(src)
    assert pickle.loads(pickle.dumps(src)).load(9999).shape == (32, 32, 3)


def test_folder_source_pickle_from_other_cwd(class_folder: Path, tmp_path: Path) -> None:
    """Paths are absolute: a pickled folder source still loads from another working dir."""
    src = FolderSource(os.path.relpath(class_folder))
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert pickle.loads(pickle.dumps(src)).load(4) is not None
    finally:
        os.chdir(cwd)
