"""``data.train.kind=manifest``: the images a ``fovea curate`` manifest lists, read from their own sources.

``path`` is the curate output folder or its ``manifest.parquet``. Each row names a data spec (``source``)
and an item ``index`` in it; the sources are opened once, lazily per process, so that data-loader workers
each open their own. Labels are the manifest's ``label`` column (-1 when the source had none).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from fovea.data.base import ImageSource, SourceConfig, parse_source_spec


class ManifestSource(ImageSource):
    """``open_source`` builds the source of a ``SourceConfig`` (``fovea.data.sources.build_source``)."""

    def __init__(self, path: str, open_source: Callable[[SourceConfig], ImageSource]) -> None:
        import pyarrow.parquet as pq
        p = Path(path)
        if p.is_dir():
            p = p / "manifest.parquet"
        if not p.exists():
            raise FileNotFoundError(f"manifest {path}: no such file (the output folder of `fovea curate`, or its "
                                    "manifest.parquet)")
        table = pq.read_table(str(p), columns=["source", "index", "label"])
        specs = table.column("source").to_pylist()
        self.specs = sorted(set(specs))
        lookup = {s: i for i, s in enumerate(self.specs)}
        self.part = np.asarray([lookup[s] for s in specs], np.int64)
        self.items = table.column("index").to_numpy().astype(np.int64)
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self.name = f"manifest:{p}"
        self.open_source = open_source
        self._sources: list[ImageSource] | None = None
        names = self.sources[0].class_names if len(self.specs) == 1 else []
        self.class_names = list(names)

    @property
    def sources(self) -> list[ImageSource]:
        if self._sources is None:
            fields = [parse_source_spec(s) for s in self.specs]
            self._sources = [self.open_source(SourceConfig(**f)) for f in fields]
        return self._sources

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sources"] = None  # each worker opens its own
        return state

    def load(self, i: int) -> np.ndarray | None:
        i = self._check_index(i)
        return self.sources[int(self.part[i])].load(int(self.items[i]))
