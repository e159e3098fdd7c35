"""Data-set specs of the command line: ``fmnist:train|test[:DIR]``, ``parquet:FILE``, ``folder:DIR``."""
from __future__ import annotations


class SpecError(ValueError):
    """A malformed data spec (the CLI reports it with exit 2)."""


def parse_source_spec(spec: str) -> dict:
    """'fmnist:train[:DIR]' | 'parquet:FILE' | 'folder:DIR' -> SourceConfig fields."""
    kind, _, rest = spec.partition(":")
    if kind == "fmnist":
        split, _, path = rest.partition(":")
        return {"kind": "fmnist", "split": split or "train", "path": path}
    if kind in ("parquet", "folder") and rest:
        return {"kind": kind, "path": rest}
    raise SpecError(f"bad data spec {spec!r}: use fmnist:train|test[:DIR], parquet:FILE or folder:DIR")
