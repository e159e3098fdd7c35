"""``fovea embed``: frozen features of every image of a source, streamed to parquet or .npy.

One row per readable image: its index in the source, its path (folder sources) and label (-1 when
unlabelled), and the chosen feature kinds (``cls``, ``mean_patch``, ``registers``, ``cls_last4``, ...,
optionally ``KIND@W`` for the first W channels). Batches are written as they are computed, so memory
stays at one batch; unreadable images are skipped and counted.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform, normalize
from fovea.data.base import ImageSource
from fovea.data.loader import ignore_stop_signals
from fovea.data.sources import SubsetSource
from fovea.eval.bank import FeatureBank, forward_bank
from fovea.models.vit import VisionTransformer


def item_identity(source: ImageSource, i: int) -> tuple[int, str]:
    """(index in the underlying source, file path or "") of item ``i`` of ``source``."""
    while isinstance(source, SubsetSource):
        i, source = int(source.indices[i]), source.base
    paths = getattr(source, "paths", None)
    return i, (paths[i] if paths is not None else "")


class _Items(Dataset):
    """Index -> (uint8 [3, S, S] view or None, index)."""

    def __init__(self, source: ImageSource, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        img = self.source.load(i)
        return (None if img is None else eval_transform(img, self.size)), i


def _collate(items: list) -> dict:
    ok = [(x, i) for x, i in items if x is not None]
    return {"images": torch.stack([x for x, _ in ok]) if ok else None, "index": [i for _, i in ok],
            "skipped": len(items) - len(ok)}


def embed_batches(backbone: VisionTransformer, source: ImageSource, kinds: list[str], size: int, device: torch.device,
                  batch_size: int = 256, num_workers: int = 0, mean: list[float] | None = None,
                  std: list[float] | None = None, progress: bool = True, desc: str = "embed"
                  ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], int]]:
    """Yield ``(item indices [b], {kind: float32 [b, D_kind]}, unreadable images in the batch)`` for every
    batch of ``source`` (indices into ``source``; unreadable images are skipped and counted)."""
    backbone = backbone.to(device).eval()
    n_last = 4 if any(k.startswith("cls_last4") for k in kinds) else 1
    loader = DataLoader(_Items(source, size), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        worker_init_fn=ignore_stop_signals if num_workers else None)
    mean, std = list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if batch["images"] is None:
            yield np.zeros(0, np.int64), {}, batch["skipped"]
            continue
        x = normalize(batch["images"].to(device), mean, std)
        with torch.no_grad():
            c, m, r = forward_bank(backbone, x, n_last)
        bank = FeatureBank(c.float().cpu(), m.float().cpu(), r.float().cpu(),
                           torch.zeros(len(batch["index"]), dtype=torch.long), backbone.n_cls > 0)
        yield np.asarray(batch["index"], np.int64), {k: bank.get(k).numpy() for k in kinds}, batch["skipped"]


def embed(backbone: VisionTransformer, source: ImageSource, out: str | Path, kinds: list[str], size: int,
          device: torch.device, batch_size: int = 256, num_workers: int = 0,
          mean: list[float] | None = None, std: list[float] | None = None, progress: bool = True) -> dict:
    """Write the features of ``source`` to ``out`` (``.parquet``: one row per image with list columns;
    ``.npy``: a dict-free float32 matrix of the kinds concatenated, plus ``OUT.index.npy`` /
    ``OUT.labels.npy``). Returns {rows, skipped, seconds, images_per_s, dims, path}."""
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in (".parquet", ".npy"):
        raise ValueError(f"--out {out}: the file must end in .parquet or .npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer, tmp = None, out.with_name(f".{out.name}.tmp")
    mats, idxs, labs = [], [], []
    rows = skipped = 0
    dims: dict[str, int] = {}
    t0 = time.time()
    try:
        for index, feats, n_bad in embed_batches(backbone, source, kinds, size, device, batch_size, num_workers,
                                                 mean, std, progress):
            skipped += n_bad
            if not len(index):
                continue
            dims = {k: int(v.shape[1]) for k, v in feats.items()}
            ident = [item_identity(source, int(i)) for i in index]
            labels = source.labels[index]
            rows += len(ident)
            if fmt == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq
                cols = {"index": pa.array([i for i, _ in ident], pa.int64()),
                        "path": pa.array([p for _, p in ident], pa.string()),
                        "label": pa.array(labels.astype(np.int64), pa.int64())}
                for k, v in feats.items():
                    cols[k] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1), pa.float32()), v.shape[1])
                table = pa.table(cols)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
            else:
                mats.append(np.concatenate([feats[k] for k in kinds], axis=1))
                idxs.append(np.asarray([i for i, _ in ident], np.int64))
                labs.append(labels.astype(np.int64))
        if rows == 0:
            raise ValueError(f"no readable image in {source.name}")
        if writer is not None:
            writer.close()
            writer = None
            tmp.replace(out)
        if fmt == ".npy":
            np.save(out, np.concatenate(mats))
            np.save(out.with_suffix(".index.npy"), np.concatenate(idxs))
            np.save(out.with_suffix(".labels.npy"), np.concatenate(labs))
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    secs = time.time() - t0
    return {"rows": rows, "skipped": skipped, "seconds": round(secs, 2), "images_per_s": round(rows / max(secs, 1e-9), 1),
            "dims": dims, "path": str(out), "bytes": out.stat().st_size}
