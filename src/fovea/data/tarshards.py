"""``data.train.kind=webdataset``: images in WebDataset tar shards, read by index.

A sample is the tar members that share a key (the member name up to its first dot, WebDataset's rule): an
image (``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` / ``.bmp``) and optionally its label, ``.cls`` (an integer
as text) or ``.json`` (``{"label": int}`` or ``{"cls": int}``). ``path`` names the shards in the brace
notation WebDataset users write (``shards/train-{00000..00999}.tar``, several ``{a..b}`` / ``{x,y}`` groups
allowed), a glob, a directory (its ``*.tar``) or one file.

The shards are indexed once: the data offset and size of every image and the labels, kept in numpy arrays
(no Python object per image, so millions of samples cost a few bytes each in every worker). Images are then
read by seeking into the shard, so the usual sampler applies: a global shuffle per epoch, each rank and worker
its own deterministic share, and a resume at the exact position. This needs seekable shards (a local or
network file system), not an HTTP stream.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
import tarfile
from typing import Any

import numpy as np

from fovea.data.base import ImageSource
from fovea.data.decode import decode_image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` alternatives."""
    parts, choices, pos = [], [], 0
    for m in _BRACE.finditer(pattern):
        parts.append(pattern[pos:m.start()])
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng:
            lo, hi = rng.group(1), rng.group(2)
            width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
            step = 1 if int(hi) >= int(lo) else -1
            choices.append([str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)])
        else:
            choices.append(body.split(","))
        pos = m.end()
    parts.append(pattern[pos:])
    out = []
    for combo in itertools.product(*choices):
        out.append("".join(p + c for p, c in zip(parts, list(combo) + [""], strict=True)))
    return out


def shard_paths(path: str) -> list[str]:
    """The tar files ``path`` names (braces, a glob, a directory or one file); missing ones are an error."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not files:
            raise FileNotFoundError(f"webdataset directory {path!r} holds no *.tar shard")
        return files
    if "{" in path:
        files = expand_braces(path)
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"webdataset {path!r}: {len(missing)} of {len(files)} shards do not exist "
                                    f"(first: {missing[0]})")
        return files
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path) if not f.endswith((".fovea-idx.npz", ".tmp.npz", ".tmp")))
        if not files:
            raise FileNotFoundError(f"webdataset pattern {path!r} matches no file")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"webdataset shard {path!r} does not exist")
    return [path]


def _label(raw: bytes, ext: str) -> int:
    try:
        if ext == ".cls":
            return int(raw.decode().strip())
        meta = json.loads(raw)
        for key in ("label", "cls"):
            if isinstance(meta, dict) and isinstance(meta.get(key), int):
                return int(meta[key])
    except (ValueError, UnicodeDecodeError):
        pass
    return -1


def index_shard(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data offsets, sizes, labels) of the images of one tar shard, in member order. The index is kept beside
    the shard (``SHARD.fovea-idx.npz``, when the folder is writable) and reused while the shard is unchanged."""
    cache = path + ".fovea-idx.npz"
    st = os.stat(path)
    try:
        with np.load(cache) as z:
            if int(z["mtime_ns"]) == st.st_mtime_ns and int(z["bytes"]) == st.st_size:
                return z["offsets"], z["sizes"], z["labels"]
    except (OSError, KeyError, ValueError):
        pass
    got = _scan_shard(path)
    try:
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(tmp, offsets=got[0], sizes=got[1], labels=got[2], mtime_ns=st.st_mtime_ns, bytes=st.st_size)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only folder: index again next time
    return got


def _scan_shard(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    pending: dict[str, int] = {}  # sample key -> position of its image (the label may come before or after)
    early: dict[str, int] = {}
    with tarfile.open(path, mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
            ext = os.path.splitext(base)[1].lower()
            if ext in IMAGE_EXTS and key not in pending:
                pending[key] = len(offsets)
                offsets.append(m.offset_data)
                sizes.append(m.size)
                labels.append(early.pop(key, -1))
            elif ext in (".cls", ".json"):
                f = tar.extractfile(m)
                value = _label(f.read() if f is not None else b"", ext)
                if key in pending:
                    labels[pending[key]] = value
                else:
                    early[key] = value
    return np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), np.asarray(labels, np.int64)


class TarShardSource(ImageSource):
    def __init__(self, path: str) -> None:
        self.paths_of_shards = [os.path.abspath(p) for p in shard_paths(path)]
        self.name = f"webdataset:{path}"
        parts = []
        for p in self.paths_of_shards:
            try:
                parts.append(index_shard(p))
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"webdataset shard {p!r} is not a readable tar file: {e}") from None
        counts = [len(o) for o, _, _ in parts]
        if sum(counts) == 0:
            raise ValueError(f"webdataset {path!r}: no images in {len(parts)} shards (looked for "
                             f"{' '.join(IMAGE_EXTS)} members)")
        self.shard = np.repeat(np.arange(len(parts), dtype=np.int32), counts)
        self.offset = np.concatenate([o for o, _, _ in parts])
        self.size = np.concatenate([s for _, s, _ in parts])
        self.labels = np.concatenate([lab for _, _, lab in parts])
        self.class_names: list[str] = []
        self._files: dict[int, Any] = {}
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_files={}, _pid=-1)  # each worker opens its own files
        return state

    def _file(self, k: int) -> Any:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(k)
        if f is None:
            if len(self._files) >= 16:  # a bounded number of open shards per process
                _, old = self._files.popitem()
                old.close()
            f = self._files[k] = open(self.paths_of_shards[k], "rb")  # noqa: SIM115 - kept open, closed on eviction
        return f

    def load(self, i: int) -> np.ndarray | None:
        i = self._check_index(i)
        try:
            f = self._file(int(self.shard[i]))
            f.seek(int(self.offset[i]))
            blob = f.read(int(self.size[i]))
        except OSError:
            return None
        return decode_image(blob)


def write_shards(source: ImageSource, out: str, per_shard: int = 1000, prefix: str = "train",
                 progress: bool = True) -> list[str]:
    """Write ``source`` as WebDataset tar shards ``OUT/PREFIX-00000.tar``...: per image ``KEY.png`` (lossless
    re-encoding) and ``KEY.cls`` when it has a label; unreadable images are left out. Returns the paths."""
    import io

    from PIL import Image
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    n_shards = max(1, -(-len(source) // per_shard))
    width = max(5, len(str(n_shards - 1)))
    paths = []
    for k in tqdm(range(n_shards), desc="shards", disable=not progress, leave=False):
        path = os.path.join(out, f"{prefix}-{k:0{width}d}.tar")
        tmp = path + ".tmp"
        with tarfile.open(tmp, mode="w") as tar:
            for i in range(k * per_shard, min(len(source), (k + 1) * per_shard)):
                img = source.load(i)
                if img is None:
                    continue
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                members = [(f"{i:09d}.png", buf.getvalue())]
                if source.labels[i] >= 0:
                    members.append((f"{i:09d}.cls", str(int(source.labels[i])).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        paths.append(path)
    return paths
