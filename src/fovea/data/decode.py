"""Robust image decoding to RGB uint8 arrays; IDX (MNIST format) reading and checksums.

Everything decodable becomes a C-contiguous, writable ``uint8`` array of shape ``[H, W, 3]``.
Unreadable inputs (corrupt, truncated, empty, not an image, decompression bomb, smaller than
``MIN_SIDE``) give ``None`` so that callers can count and skip them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from typing import NamedTuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_EXTENSIONS", "MIN_SIDE", "decode_image", "to_rgb_array", "read_idx",
           "FileSum", "FMNIST_CHECKSUMS", "verify_fmnist_file"]

#: Images whose smaller side is below this are treated as unreadable (a 1x1 pixel is no image).
MIN_SIDE = 2

#: File extensions (lower case) recognised as images by folder sources.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

ImageInput = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


def decode_image(src: ImageInput) -> np.ndarray | None:
    """Decode encoded bytes or a file path to RGB uint8 ``[H, W, 3]``; ``None`` if unreadable.

    Never raises for bad data: any decoding error (including ``DecompressionBombError``) maps
    to ``None``. Truncated files are rejected (``LOAD_TRUNCATED_IMAGES`` is not touched).
    """
    try:
        fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
        with Image.open(fp) as im:
            if min(im.size) < MIN_SIDE:  # cheap check before decoding the pixels
                return None
            im.load()  # raises OSError on truncated / corrupt data
            return to_rgb_array(im)
    except Exception:  # noqa: BLE001 - Pillow raises many types on bad data; all mean "unreadable"
        return None


def to_rgb_array(im: Image.Image) -> np.ndarray | None:
    """Convert a loaded PIL image of any mode to RGB uint8 ``[H, W, 3]`` (C-contiguous).

    Applies EXIF orientation, composites transparency over white, scales 16-bit / int / float
    images to 8 bit. Returns ``None`` if the result is smaller than ``MIN_SIDE``.
    """
    im = _apply_orientation(im)
    mode = im.mode
    if mode in _HIGH_BIT_MODES:
        im = Image.fromarray(_high_bit_to_uint8(np.asarray(im)), mode="L")
        mode = "L"
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        im = _over_white(im.convert("RGBA"))
    elif mode != "RGB":
        im = im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV ...
    arr = np.array(im, dtype=np.uint8)  # copy: writable and C-contiguous
    if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < MIN_SIDE:
        return None
    return np.ascontiguousarray(arr)


def _apply_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip according to the EXIF orientation tag, if present and not 1."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF must not make the image unreadable
        return im
    if orientation in (None, 1):
        return im
    return ImageOps.exif_transpose(im)


def _over_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image over a white background; returns RGB."""
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_bit_to_uint8(a: np.ndarray) -> np.ndarray:
    """Map a 2-D 16-bit / int32 / float image to uint8 ``[H, W]``.

    Integer data in 0..65535 (16-bit PNG/TIFF, Pillow modes ``I;16*`` and ``I``) is scaled by
    1/257 with rounding (65535 -> 255, 32896 -> 128). Float data in [0, 1] is scaled by 255;
    float data in [0, 255] is rounded; anything else is min-max normalised.
    """
    a = np.asarray(a)
    if a.dtype.kind in "ui":
        ilo, ihi = int(a.min()), int(a.max())
        if ilo >= 0 and ihi <= 65535:
            return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return _minmax(a.astype(np.float64))
    f = a.astype(np.float64)
    if not np.all(np.isfinite(f)):
        f = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(f.min()), float(f.max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(f * 255.0).astype(np.uint8)
    if lo >= 0.0 and hi <= 255.0:
        return np.rint(f).astype(np.uint8)
    return _minmax(f)


def _minmax(f: np.ndarray) -> np.ndarray:
    """Linearly rescale a float array to 0..255 uint8 (constant arrays give 0)."""
    lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        return np.zeros(f.shape, np.uint8)
    return np.rint((f - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# ----------------------------------------------------------------------------------- IDX files

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike[str], expect_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (optionally gzipped, detected from its content) into a numpy array.

    The header is: two zero bytes, a type code (0x08 = uint8 ...), the number of dims, then
    one big-endian uint32 per dim. MNIST images have magic 2051 (uint8, 3 dims -> ``[N, 28, 28]``),
    labels 2049 (uint8, 1 dim -> ``[N]``). Raises ``ValueError`` naming the file on any
    inconsistency (bad magic, wrong size) and ``FileNotFoundError`` if it does not exist.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (only {len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expect_magic}")
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path} is not an IDX file (magic number {magic:#010x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX dims {dims} need {expected} data bytes, file has {len(data) - header}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable, owns memory


# ------------------------------------------------------- Fashion-MNIST archive checksums

class FileSum(NamedTuple):
    """Checksums of one published .gz file and of its decompressed IDX payload."""

    gz_md5: str  # official, zalandoresearch/fashion-mnist README
    gz_sha256: str  # official .gz as served by FMNIST_URL
    raw_sha256: str  # decompressed IDX bytes (identical in re-compressed copies, e.g. Debian's)


FMNIST_CHECKSUMS: dict[str, FileSum] = {
    "train-images-idx3-ubyte.gz": FileSum(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte.gz": FileSum(
        "25c81989df183df01b3e8a0aad5dffbe",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte.gz": FileSum(
        "bef4ecab320f06d8554ea6380940ec79",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte.gz": FileSum(
        "bb300cfdad3c16e7a12a480ee83cd310",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}


def verify_fmnist_file(path: str, expected: FileSum) -> str | None:
    """``None`` if ``path`` matches ``expected``, else a message describing the mismatch.

    Accepted: the official .gz bytes (MD5 and SHA-256), or any gzip whose decompressed payload
    has the official SHA-256 (a mirror that re-compressed the files, like Debian's package).
    """
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
            sha.update(block)
    if md5.hexdigest() == expected.gz_md5 and sha.hexdigest() == expected.gz_sha256:
        return None
    raw = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                raw.update(block)
    except Exception as e:  # noqa: BLE001 - corrupt gzip = mismatch
        return f"not a valid gzip file ({e}); sha256 {sha.hexdigest()}"
    if raw.hexdigest() == expected.raw_sha256:
        return None
    return (f"sha256 {sha.hexdigest()} (expected {expected.gz_sha256}), decompressed sha256 "
            f"{raw.hexdigest()} (expected {expected.raw_sha256})")
