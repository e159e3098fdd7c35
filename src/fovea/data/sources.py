"""Image sources: Fashion-MNIST (IDX), Hugging Face style parquet, and image folders.

Every source exposes ``labels`` (int64 ``[N]``, -1 = unlabelled), ``class_names`` and
``load(i) -> uint8 [H, W, 3] | None`` (``None`` = unreadable item, to be counted and skipped).
Sources are picklable and cheap to pickle except Fashion-MNIST (47 MB of pixels), so they can
be handed to DataLoader worker processes; parquet files are (re)opened lazily per process.
"""

from __future__ import annotations

import dataclasses

import json
import os
from collections import OrderedDict
from pathlib import Path
from collections.abc import Sequence
from typing import Any, overload

import numpy as np

from fovea.data.base import ImageSource, SourceConfig
from fovea.data.decode import FMNIST_CHECKSUMS, IMAGE_EXTENSIONS, decode_image, verify_fmnist_file
from fovea.data.fmnist import (  # noqa: F401 - re-exported
    FMNIST_CLASSES, FMNIST_DEFAULT_DIRS, FMNIST_URL, FashionMNISTSource, download_fmnist, find_fmnist_dir,
)

__all__ = ["FMNIST_CLASSES", "FMNIST_DEFAULT_DIRS", "FMNIST_URL", "SourceConfig", "default_data_root", "resolve_data_path", "ImageSource", "FashionMNISTSource", "ParquetSource", "FolderSource",
           "SubsetSource", "ConcatSource", "parquet_shards", "build_source", "fetch_with_replacement", "probe_source",
           "find_fmnist_dir", "download_fmnist", "verify_fmnist_file", "FMNIST_CHECKSUMS"]

# ------------------------------------------------------------------------------- parquet

#: Per-process budget for cached row groups of encoded image bytes (LRU, whole groups).
PARQUET_CACHE_BYTES = 128 << 20


class ParquetSource(ImageSource):
    """Hugging Face image parquet: ``image`` = struct{bytes, path}, optional int64 ``label``.

    Labels are read eagerly; encoded image bytes are read lazily one row group at a time and
    kept in a per-process LRU cache bounded by ``cache_bytes``. No file handle is pickled.
    """

    def __init__(self, path: str, cache_bytes: int = PARQUET_CACHE_BYTES) -> None:
        import pyarrow.parquet as pq

        if not os.path.isfile(path):
            raise FileNotFoundError(f"parquet file {path!r} does not exist")
        self.path = os.path.abspath(path)
        self.name = f"parquet:{path}"
        self.cache_bytes = int(cache_bytes)
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path!r} is not a readable parquet file: {e}") from e
        schema = pf.schema_arrow
        if "image" not in schema.names or schema.field("image").type.num_fields == 0 or \
                schema.field("image").type.get_field_index("bytes") < 0:
            raise ValueError(f"parquet file {path!r} has no column image = struct{{bytes, path}} "
                             f"(columns: {schema.names})")
        md = pf.metadata
        rows = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # [G + 1]
        if "label" in schema.names:
            col = pf.read(columns=["label"], use_threads=False).column("label")
            self.labels = col.fill_null(-1).to_numpy().astype(np.int64)
        else:
            self.labels = np.full(int(self._starts[-1]), -1, np.int64)
        if len(self.labels) == 0:
            raise ValueError(f"parquet file {path!r} contains no rows")
        self.class_names = _hf_class_names(schema.metadata)
        self._pf: Any = None
        self._pid = -1
        self._cache: OrderedDict[int, tuple[list[Any], int]] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pf=None, _pid=-1, _cache=OrderedDict())  # reopened lazily in the worker
        return state

    def release(self) -> None:
        """Drop the open file and the cached row groups (reopened on the next read)."""
        self._pf, self._pid, self._cache = None, -1, OrderedDict()

    def _group(self, g: int) -> list[Any]:
        """Encoded images of row group ``g``: list of bytes or path strings (None if neither)."""
        hit = self._cache.get(g)
        if hit is not None:
            self._cache.move_to_end(g)
            return hit[0]
        if self._pf is None or self._pid != os.getpid():
            import pyarrow.parquet as pq

            self._pf, self._pid, self._cache = pq.ParquetFile(self.path), os.getpid(), OrderedDict()
        col = self._pf.read_row_group(g, columns=["image"], use_threads=False).column("image")
        col = col.combine_chunks()
        blobs = col.field("bytes").to_pylist()
        if any(b is None for b in blobs) and col.type.get_field_index("path") >= 0:
            paths = col.field("path").to_pylist()
            blobs = [b if b is not None else self._resolve(p) for b, p in zip(blobs, paths)]
        size = sum(len(b) for b in blobs if b is not None)
        self._cache[g] = (blobs, size)
        total = sum(s for _, s in self._cache.values())
        while total > self.cache_bytes and len(self._cache) > 1:
            total -= self._cache.popitem(last=False)[1][1]
        return blobs

    def _resolve(self, p: str | None) -> str | None:
        """An image stored by path only: absolute, or relative to the parquet file's folder."""
        if not p:
            return None
        return p if os.path.isabs(p) else os.path.join(os.path.dirname(self.path), p)

    def load(self, i: int) -> np.ndarray | None:
        i = self._check_index(i)
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        try:
            blob = self._group(g)[i - int(self._starts[g])]
        except Exception:  # noqa: BLE001 - a corrupt row group makes its items unreadable
            return None
        return None if blob is None else decode_image(blob)


def _hf_class_names(metadata: dict[bytes, bytes] | None) -> list[str]:
    """Class names from the ``huggingface`` schema metadata (info.features.label.names)."""
    try:
        hf = json.loads((metadata or {})[b"huggingface"])
        features = hf.get("info", {}).get("features", {})
        label = features.get("label", {})
        if "feature" in label and "names" not in label:  # Sequence(ClassLabel) style
            label = label["feature"]
        return [str(n) for n in label.get("names", [])]
    except (KeyError, ValueError, AttributeError, TypeError):
        return []


# -------------------------------------------------------------------------------- folder

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str) -> list[str]:
    """All image files below ``root`` (recursive, hidden entries skipped), sorted by path."""
    out: list[str] = []
    for d, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
        out.extend(os.path.join(d, f) for f in files if _is_image(f))
    return sorted(out)


class PathList(Sequence[str]):
    """File paths kept as one UTF-8 buffer and an offset array: no Python object per file (a folder of
    millions of images costs a few bytes per image in every data-loader worker); items decode on access."""

    def __init__(self, paths: list[str]) -> None:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._blob = np.frombuffer(b"".join(encoded), np.uint8).copy()
        self._off = np.concatenate([[0], np.cumsum([len(e) for e in encoded], dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self._off) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return self._blob[self._off[i]:self._off[i + 1]].tobytes().decode("utf-8", "surrogateescape")


class FolderSource(ImageSource):
    """Images in ``root/<class>/**`` (labels = index in sorted class names), or unlabelled.

    The folder is unlabelled (labels -1, every image below ``root`` recursively) when image
    files sit directly in ``root``; otherwise its non-hidden subfolders are the classes.
    """

    def __init__(self, root: str) -> None:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
        self.root = os.path.abspath(root)
        self.name = f"folder:{root}"
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        top_images = [e for e in entries if e.is_file() and _is_image(e.name)]
        class_dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        paths: list[str] = []
        labels: list[int] = []
        if top_images or not class_dirs:
            paths = _walk_images(self.root)
            labels = [-1] * len(paths)
            self.class_names: list[str] = []
        else:
            self.class_names = class_dirs
            for k, c in enumerate(class_dirs):
                found = _walk_images(os.path.join(self.root, c))
                paths += found
                labels += [k] * len(found)
        if not paths:
            raise ValueError(f"folder {root} contains no image files "
                             f"(looked for {' '.join(IMAGE_EXTENSIONS)}, case-insensitive)")
        self.paths = PathList(paths)
        self.labels = np.asarray(labels, np.int64)

    def load(self, i: int) -> np.ndarray | None:
        return decode_image(self.paths[self._check_index(i)])


# ------------------------------------------------------------------------- subset, build

class SubsetSource(ImageSource):
    """Items ``indices`` (int64 ``[M]``) of another source, in that order."""

    def __init__(self, base: ImageSource, indices: np.ndarray, note: str = "") -> None:
        self.base = base
        self.indices = np.asarray(indices, np.int64)
        self.labels = base.labels[self.indices]
        self.class_names = base.class_names
        self.name = f"{base.name} [{note or f'{len(self.indices)} of {len(base)} items'}]"

    def load(self, i: int) -> np.ndarray | None:
        return self.base.load(int(self.indices[self._check_index(i)]))


class ConcatSource(ImageSource):
    """Several sources one after the other (the shards of a data set): item ``i`` is item ``i - start[k]`` of
    part ``k``. ``paths`` are the parts' own when every part has them."""

    def __init__(self, parts: list[ImageSource], name: str) -> None:
        if not parts:
            raise ValueError(f"{name}: no parts")
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.labels = np.concatenate([p.labels for p in parts])
        self.class_names = parts[0].class_names
        self.name = name
        if all(getattr(p, "paths", None) is not None for p in parts):
            self.paths = [x for p in parts for x in getattr(p, "paths")]

    #: parts that keep their open file and cached row groups in a process (the least recently read lets go)
    max_open = 8

    def locate(self, i: int) -> tuple[int, int]:
        """(part, index in that part) of item ``i``."""
        i = self._check_index(i)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def load(self, i: int) -> np.ndarray | None:
        k, j = self.locate(i)
        recent: OrderedDict[int, None] = self.__dict__.setdefault("_recent", OrderedDict())
        recent[k] = None
        recent.move_to_end(k)
        while len(recent) > self.max_open:
            old, _ = recent.popitem(last=False)
            release = getattr(self.parts[old], "release", None)
            if release is not None:
                release()
        return self.parts[k].load(j)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_recent", None)
        return state


def parquet_shards(path: str) -> list[str]:
    """The parquet files a ``parquet`` path names: one file, every ``*.parquet`` of a directory (sorted), or
    the files of a glob pattern (``shards/train-*.parquet``, sorted)."""
    import glob
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"parquet directory {path!r} holds no *.parquet file")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise FileNotFoundError(f"parquet pattern {path!r} matches no file")
        return files
    return [path]


def default_data_root() -> str:
    """``$FOVEA_DATA``, else ``../shared/data`` beside the fovea checkout (when it exists), else ``data``."""
    env = os.environ.get("FOVEA_DATA")
    if env:
        return env
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "data"
        if (parent / "main").exists() and cand.is_dir():
            return str(cand)
        if (parent / "pyproject.toml").exists() and (parent.parent / "shared" / "data").is_dir():
            return str(parent.parent / "shared" / "data")
    return "data"


def resolve_data_path(path: str) -> str:
    """Expand ``$FOVEA_DATA`` (see :func:`default_data_root`), other env vars and ``~`` in a path."""
    if not path:
        return path
    if "$FOVEA_DATA" in path or "${FOVEA_DATA}" in path:
        root = default_data_root()
        path = path.replace("${FOVEA_DATA}", root).replace("$FOVEA_DATA", root)
    return os.path.expanduser(os.path.expandvars(path))


def build_source(cfg: SourceConfig) -> ImageSource:
    """Create the source described by ``cfg`` (raises FileNotFoundError / ValueError)."""
    kind = cfg.kind.lower().strip()
    cfg = dataclasses.replace(cfg, path=resolve_data_path(cfg.path))
    src: ImageSource
    if kind in ("fmnist", "fashion-mnist", "fashion_mnist"):
        src = FashionMNISTSource(cfg.path, cfg.split)
    elif kind == "parquet":
        if not cfg.path:
            raise ValueError("source kind 'parquet' needs path=<file.parquet, a directory of them or a glob>")
        files = parquet_shards(cfg.path)
        src = ParquetSource(files[0]) if len(files) == 1 and files[0] == cfg.path else \
            ConcatSource([ParquetSource(f) for f in files], f"parquet:{cfg.path} ({len(files)} files)")
    elif kind == "folder":
        if not cfg.path:
            raise ValueError("source kind 'folder' needs path=<directory>")
        src = FolderSource(cfg.path)
    elif kind == "webdataset":
        if not cfg.path:
            raise ValueError("source kind 'webdataset' needs path=<shards, e.g. shards/train-{00000..00099}.tar>")
        from fovea.data.tarshards import TarShardSource
        src = TarShardSource(cfg.path)
    elif kind == "manifest":
        if not cfg.path:
            raise ValueError("source kind 'manifest' needs path=<fovea curate output folder or manifest.parquet>")
        from fovea.data.manifest import ManifestSource
        src = ManifestSource(cfg.path, build_source)
    else:
        raise ValueError(f"unknown source kind {cfg.kind!r} (expected fmnist, parquet, folder, webdataset or manifest)")
    if cfg.limit < 0:
        raise ValueError(f"limit must be >= 0, got {cfg.limit}")
    if 0 < cfg.limit < len(src):
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.choice(len(src), size=cfg.limit, replace=False))  # sorted: locality
        src = SubsetSource(src, idx, f"random {cfg.limit} of {len(src)}, seed {cfg.seed}")
    return src


def fetch_with_replacement(src: ImageSource, i: int,
                           max_tries: int = 64) -> tuple[np.ndarray, int, int]:
    """Load item ``i``, else ``(i+1)%N``, ``(i+2)%N``, ...: returns (image, index used, n skipped).

    Raises ``RuntimeError`` naming the source if ``max_tries`` consecutive items are unreadable.
    """
    n = len(src)
    if n == 0:
        raise RuntimeError(f"{src.name} is empty")
    tries = max(1, min(max_tries, n))
    for k in range(tries):
        j = (i + k) % n
        img = src.load(j)
        if img is not None:
            return img, j, k
    raise RuntimeError(f"{src.name}: {tries} consecutive items starting at index {i} are "
                       "unreadable (corrupt, truncated or not images); check the data")


def probe_source(src: ImageSource, n: int = 32) -> None:
    """Decode up to ``n`` items spread evenly over ``src``; ``ValueError`` if none decodes."""
    total = len(src)
    idx = np.unique(np.linspace(0, max(total - 1, 0), num=max(1, min(n, total))).round())
    if total > 0:
        for i in idx.astype(np.int64):
            if src.load(int(i)) is not None:
                return
    raise ValueError(f"no readable image in {src.name}: tried {len(idx) if total else 0} of "
                     f"{total} items and none could be decoded (corrupt files or wrong format?)")
