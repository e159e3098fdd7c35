"""The source interface: :class:`SourceConfig` and the :class:`ImageSource` base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np


SourceKind = Literal["fmnist", "parquet", "folder", "webdataset", "manifest"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)


@dataclass
class SourceConfig:
    """Which images to read. ``limit > 0`` keeps a fixed random subset (seeded by ``seed``)."""

    kind: SourceKind = "fmnist"  # fmnist | parquet | folder | webdataset (tar shards) | manifest (the output of `fovea curate`)
    path: str = ""  # fmnist: dir with IDX files ("" = default search); parquet: file, directory of *.parquet shards or glob; folder: dir; webdataset: shards as shards/train-{00000..00099}.tar, a glob or a dir; manifest: curate folder or its manifest.parquet
    split: str = "train"  # fmnist only: "train" | "test"
    limit: int = 0  # > 0: a fixed random subset of this many images
    seed: int = 0  # seed of the `limit` subset


class ImageSource:
    """Base class: ``N`` items with ``labels`` int64 ``[N]`` (-1 = none) and ``class_names``."""

    name: str = "source"
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return int(len(self.labels))

    def load(self, i: int) -> np.ndarray | None:
        """RGB uint8 ``[H, W, 3]`` (C-contiguous) for item ``i``, or ``None`` if unreadable."""
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.name} ({n} items)")
        return int(i) % n

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self)} items>"


class SpecError(ValueError):
    """A malformed data spec (the CLI reports it with exit 2)."""


def parse_source_spec(spec: str) -> dict:
    """'fmnist:train[:DIR]' | 'parquet:FILE' | 'folder:DIR' | 'webdataset:SHARDS' | 'manifest:DIR' -> SourceConfig
    fields."""
    kind, _, rest = spec.partition(":")
    if kind == "fmnist":
        split, _, path = rest.partition(":")
        return {"kind": "fmnist", "split": split or "train", "path": path}
    if kind in ("parquet", "folder", "webdataset", "manifest") and rest:
        return {"kind": kind, "path": rest}
    raise SpecError(f"bad data spec {spec!r}: use fmnist:train|test[:DIR], parquet:FILE, folder:DIR, "
                    "webdataset:SHARDS or manifest:DIR")
