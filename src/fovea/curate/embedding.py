"""Embeddings of ``fovea curate``, streamed to memory-mapped ``.npy`` files and cached by content key.

A cache entry is ``KEY.npy`` (float32 ``[N_readable, D]``, L2-normalised) and ``KEY.index.npy`` (int64: the
item of the source each row belongs to); ``KEY`` hashes the model file (path, size, mtime), the data spec,
the input size and the feature kind, so a second ``fovea curate`` over the same pool re-embeds nothing.
Entries are written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fovea.data.base import ImageSource
from fovea.eval.embed import embed_batches
from fovea.models.vit import VisionTransformer


@dataclass
class Embedded:
    """One data set's embeddings: ``x`` [N_readable, D] (memory map), ``items`` [N_readable] (index in the
    source), ``skipped`` unreadable images, ``cached`` whether they came from the cache, ``seconds``."""

    spec: str
    source: ImageSource
    x: np.ndarray
    items: np.ndarray
    skipped: int
    cached: bool
    seconds: float


def model_key(model: str) -> dict:
    """What identifies a model file (or folder) for the cache."""
    p = Path(model)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in (".pt", ".safetensors", ".pth"))
    return {"model": str(p.resolve()), "files": [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files]}


def cache_key(model: dict, spec: str, size: int, feature: str) -> str:
    text = json.dumps({"v": 1, **model, "spec": spec, "size": size, "feature": feature}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def embed_cached(backbone: VisionTransformer, spec: str, source: ImageSource, cache: Path, key: str, feature: str,
                 size: int, device: torch.device, batch_size: int, num_workers: int, mean: list[float] | None,
                 std: list[float] | None, progress: bool, what: str) -> Embedded:
    """Embeddings of ``source`` (the ``feature`` kind, L2-normalised), from ``cache`` when present."""
    cache.mkdir(parents=True, exist_ok=True)
    path, ipath, meta = cache / f"{key}.npy", cache / f"{key}.index.npy", cache / f"{key}.json"
    if path.exists() and ipath.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return Embedded(spec, source, np.load(path, mmap_mode="r"), np.load(ipath), int(info["skipped"]), True, 0.0)
    t0 = time.time()
    tmp = cache / f".{key}.{os.getpid()}.npy"
    out: np.ndarray | None = None
    items = np.empty(len(source), np.int64)
    n = skipped = 0
    try:
        for index, feats, bad in embed_batches(backbone, source, [feature], size, device, batch_size, num_workers,
                                               mean, std, progress, desc=f"embed {what}"):
            skipped += bad
            if not len(index):
                continue
            v = feats[feature]
            v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(source), v.shape[1]))
            out[n:n + len(v)] = v
            items[n:n + len(v)] = index
            n += len(v)
        if out is None or n == 0:
            raise ValueError(f"{what} {spec}: no readable image")
        out.flush()  # type: ignore[attr-defined]
        d = out.shape[1]
        del out
        if n < len(source):  # unreadable images: keep the first n rows
            full = np.load(tmp, mmap_mode="r")
            trimmed = np.lib.format.open_memmap(path.with_name(f".{key}.trim.npy"), mode="w+", dtype=np.float32,
                                                shape=(n, d))
            for a in range(0, n, 65536):
                trimmed[a:a + 65536] = full[a:min(n, a + 65536)]
            trimmed.flush()
            del trimmed, full
            tmp.unlink()
            tmp = path.with_name(f".{key}.trim.npy")
        np.save(ipath, items[:n])
        tmp.replace(path)
        meta.write_text(json.dumps({"spec": spec, "rows": n, "skipped": skipped, "feature": feature, "size": size}))
    finally:
        tmp.unlink(missing_ok=True)
    return Embedded(spec, source, np.load(path, mmap_mode="r"), items[:n], skipped, False, round(time.time() - t0, 2))
