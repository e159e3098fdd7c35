"""The NYU-Depth v2 layout of BTS / ZoeDepth: ``DIR/nyu_train.txt`` and ``DIR/nyu_test.txt``, one pair a line
``rgb_relpath depth_relpath [focal]`` (e.g. ``/kitchen_0028a/rgb_00045.jpg /kitchen_0028a/sync_depth_00045.png
518.8579``), paths relative to DIR (a leading slash is stripped); RGB images of any format
:func:`fovea.data.decode.decode_image` reads and 16-bit single-channel depth PNGs in millimetres (0 = no depth).

:func:`check_split` refuses bad input before any work (a missing list or file, a depth PNG that is not 16-bit,
a depth PNG whose size differs from its RGB image) by raising :class:`fovea.errors.ConfigError` naming the
file, reading only the image headers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fovea.errors import ConfigError

LISTS = {"train": "nyu_train.txt", "test": "nyu_test.txt"}
#: depth PNG value -> metres
DEPTH_SCALE = 1000.0


@dataclass(frozen=True)
class Pair:
    """One list entry: absolute paths of the RGB image and its depth PNG, the focal length (None when the
    line has 2 fields) and the image size (H, W) read from the header by :func:`check_split`."""

    rgb: Path
    depth: Path
    rel: str
    focal: float | None = None
    size: tuple[int, int] = (0, 0)

    @property
    def name(self) -> str:
        """The RGB relative path without its extension (``kitchen_0028a/rgb_00045``): the prediction's name."""
        return str(Path(self.rel).with_suffix(""))


def parse_spec(spec: str) -> Path:
    """``nyu:DIR`` -> DIR (refused unless the prefix is ``nyu``)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind != "nyu" or not path:
        raise ConfigError(f"--data {spec!r}: expected nyu:DIR (the BTS / ZoeDepth NYU-Depth v2 layout)")
    return Path(path)


def read_list(root: Path, split: str) -> list[Pair]:
    """The pairs of ``root/nyu_{split}.txt`` (sizes not yet read); blank lines and ``#`` comments skipped."""
    path = root / LISTS[split]
    if not path.is_file():
        raise ConfigError(f"{path}: missing file list of the {split} split (expected {LISTS[split]} in {root})")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        f = line.split()
        if not f or f[0].startswith("#"):
            continue
        if len(f) not in (2, 3):
            raise ConfigError(f"{path}:{n}: expected 'rgb_path depth_path [focal]', got {len(f)} fields")
        try:
            focal = float(f[2]) if len(f) == 3 else None
        except ValueError:
            raise ConfigError(f"{path}:{n}: focal {f[2]!r} is not a number") from None
        rel = f[0].lstrip("/")
        pairs.append(Pair(root / rel, root / f[1].lstrip("/"), rel, focal))
    if not pairs:
        raise ConfigError(f"{path}: no pairs listed")
    return pairs


def _header(path: Path) -> tuple[str, tuple[int, int]] | None:
    """(PIL mode, (H, W)) from the image header, None when unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.mode, (im.size[1], im.size[0])
    except Exception:
        return None


def check_split(root: Path, split: str) -> tuple[list[Pair], list[str]]:
    """Read and check a split: (pairs with their sizes, relative RGB paths whose image header is unreadable:
    skipped and counted). Raises ConfigError naming the file for a missing file, a depth PNG that is not
    16-bit single channel (or unreadable) and a depth PNG whose size differs from its RGB image."""
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    out, skipped = [], []
    for p in read_list(root, split):
        for f in (p.rgb, p.depth):
            if not f.is_file():
                raise ConfigError(f"{f}: missing file (listed in {root / LISTS[split]})")
        d = _header(p.depth)
        if d is None or d[0] not in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            raise ConfigError(f"{p.depth}: not a 16-bit depth PNG (mode {d[0] if d else 'unreadable'}; "
                              "expected single-channel uint16 depth in mm)")
        r = _header(p.rgb)
        if r is None:
            skipped.append(p.rel)
            continue
        if r[1] != d[1]:
            raise ConfigError(f"{p.depth}: depth is {d[1][0]}x{d[1][1]} px but its image {p.rgb} is "
                              f"{r[1][0]}x{r[1][1]}")
        out.append(Pair(p.rgb, p.depth, p.rel, p.focal, d[1]))
    return out, skipped


def read_depth(path: Path) -> np.ndarray:
    """Depth PNG -> float32 [H, W] in metres (value / 1000; 0 stays 0 = no depth)."""
    import cv2
    d = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if d is None or d.dtype != np.uint16 or d.ndim != 2:
        raise ConfigError(f"{path}: not a single-channel 16-bit depth PNG")
    return d.astype(np.float32) / DEPTH_SCALE


def read_pair(p: Pair) -> tuple[np.ndarray, np.ndarray] | None:
    """(RGB uint8 [H, W, 3], depth float32 [H, W] metres), None when the RGB image does not decode."""
    from fovea.data.decode import decode_image
    img = decode_image(str(p.rgb))
    if img is None:
        return None
    d = read_depth(p.depth)
    if d.shape != img.shape[:2]:
        raise ConfigError(f"{p.depth}: depth is {d.shape[0]}x{d.shape[1]} px but its image {p.rgb} is "
                          f"{img.shape[0]}x{img.shape[1]}")
    return img, d


def input_size(shape: tuple[int, int], size: int, patch: int) -> tuple[int, int]:
    """Backbone input (H', W') of an image of ``shape`` (H, W): ``size`` = 0 keeps the image's own size,
    otherwise the shorter side is scaled to ``size`` keeping the aspect ratio; then each side is rounded
    to the nearest multiple of the patch size (at least one patch). 480x640 at size 0, patch 14 -> 476x644;
    120x160 at size 64, patch 16 -> 64x80."""
    h, w = shape
    s = 1.0 if size <= 0 else size / min(h, w)
    return (max(patch, int(h * s / patch + 0.5) * patch), max(patch, int(w * s / patch + 0.5) * patch))


def resize_rgb(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3] (cv2 INTER_AREA when shrinking, bicubic when enlarging)."""
    import cv2
    h, w = hw
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if h * w < img.shape[0] * img.shape[1] else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(img, (w, h), interpolation=interp))
