"""Reader of the SPair-71k layout: ``DIR/JPEGImages/<category>/<name>.jpg`` and one JSON per pair under
``DIR/PairAnnotation/<split>/`` with ``src_imname``, ``trg_imname``, ``category``, ``src_kps``, ``trg_kps``
(lists of ``[x, y]`` in pixels of the original image) and ``src_bndbox``, ``trg_bndbox``
(``[x1, y1, x2, y2]``). Any other key of the real SPair JSONs (``filename``, ``src_imsize``,
``viewpoint_variation``...) is ignored.

Everything is checked before any image is decoded; a bad pair file is refused with a
:class:`fovea.errors.ConfigError` naming it: no keypoints, unequal source / target keypoint counts, a
keypoint that is not two numbers, a missing or degenerate box, a missing image.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fovea.errors import ConfigError

#: the ``--data`` prefix of this protocol
KIND = "spair"


@dataclass(frozen=True)
class Pair:
    """One annotated pair: keypoints ``[K, 2]`` float64 (x, y) in original pixels, boxes ``[4]`` float64
    (x1, y1, x2, y2) in original pixels, image paths resolved under ``JPEGImages/<category>/``."""

    name: str  # the pair JSON's file name without ".json"
    category: str
    src_imname: str
    trg_imname: str
    src_kps: np.ndarray
    trg_kps: np.ndarray
    src_bbox: np.ndarray
    trg_bbox: np.ndarray
    src_path: Path
    trg_path: Path

    @property
    def n_kps(self) -> int:
        return int(len(self.src_kps))


def parse_spec(spec: str) -> Path:
    """``spair:DIR`` (or a bare existing ``DIR``) -> the SPair root folder; another ``kind:`` is refused."""
    if spec.startswith(KIND + ":"):
        return Path(spec[len(KIND) + 1:]).expanduser()
    m = re.match(r"^([A-Za-z][A-Za-z0-9_]*):", spec)
    if m and not Path(spec).exists():
        raise ConfigError(f"--data {spec!r}: the correspondence protocol reads SPair ('spair:DIR'), "
                          f"not {m.group(1)!r}")
    return Path(spec).expanduser()


def _points(v: Any, key: str, f: Path) -> np.ndarray:
    """A list of [x, y] -> [K, 2] float64 (K >= 1), else ConfigError naming ``f``."""
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{f}: '{key}' has no keypoints")
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{f}: '{key}' is not a list of [x, y] numbers ({e})") from None
    if a.ndim != 2 or a.shape[1] < 2:
        raise ConfigError(f"{f}: '{key}' is not a list of [x, y] pairs (shape {list(a.shape)})")
    a = a[:, :2]
    if not np.isfinite(a).all():
        raise ConfigError(f"{f}: '{key}' holds a non-finite coordinate")
    return a


def _box(v: Any, key: str, f: Path) -> np.ndarray:
    """[x1, y1, x2, y2] with x2 > x1 and y2 > y1 -> [4] float64, else ConfigError naming ``f``."""
    if v is None:
        raise ConfigError(f"{f}: no '{key}' (bounding box [x1, y1, x2, y2])")
    try:
        b = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ConfigError(f"{f}: '{key}' is not [x1, y1, x2, y2]: {v!r}") from None
    if b.shape != (4,) or not np.isfinite(b).all():
        raise ConfigError(f"{f}: '{key}' is not [x1, y1, x2, y2]: {v!r}")
    if b[2] <= b[0] or b[3] <= b[1]:
        raise ConfigError(f"{f}: '{key}' {v!r} is empty (x2 <= x1 or y2 <= y1)")
    return b


def read_pair(f: Path, images: Path) -> Pair:
    """One pair JSON ``f`` (images under ``images`` = ``DIR/JPEGImages``), checked (see module doc)."""
    try:
        d = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: not a readable JSON file ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: not a JSON object")
    for key in ("src_imname", "trg_imname", "category"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise ConfigError(f"{f}: no '{key}'")
    for key in ("src_kps", "trg_kps"):
        if key not in d:
            raise ConfigError(f"{f}: no '{key}' (keypoints)")
    src, trg = _points(d["src_kps"], "src_kps", f), _points(d["trg_kps"], "trg_kps", f)
    if len(src) != len(trg):
        raise ConfigError(f"{f}: {len(src)} source keypoints but {len(trg)} target keypoints")
    sb, tb = _box(d.get("src_bndbox"), "src_bndbox", f), _box(d.get("trg_bndbox"), "trg_bndbox", f)
    cat = d["category"]
    paths = []
    for key in ("src_imname", "trg_imname"):
        p = images / cat / d[key]
        if not p.is_file():
            raise ConfigError(f"{f}: image {p} ('{key}') does not exist")
        paths.append(p)
    return Pair(f.name[:-5] if f.name.endswith(".json") else f.name, cat, d["src_imname"], d["trg_imname"],
                src, trg, sb, tb, paths[0], paths[1])


def read_spair(root: str | Path, split: str = "test") -> list[Pair]:
    """All pairs of ``root/PairAnnotation/<split>/*.json`` sorted by (category, file name), checked
    before anything is decoded. Raises ConfigError naming the folder or the bad file."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"SPair folder {root} does not exist")
    ann, images = root / "PairAnnotation" / split, root / "JPEGImages"
    if not ann.is_dir():
        raise ConfigError(f"{ann} does not exist (SPair layout: DIR/PairAnnotation/<split>/*.json, split={split!r})")
    if not images.is_dir():
        raise ConfigError(f"{images} does not exist (SPair layout: DIR/JPEGImages/<category>/*.jpg)")
    files = sorted(ann.glob("*.json"))
    if not files:
        raise ConfigError(f"{ann} holds no pair JSON file")
    pairs = [read_pair(f, images) for f in files]
    return sorted(pairs, key=lambda p: (p.category, p.name))
