"""Data-set specs of the command line: ``fmnist:train|test[:DIR]``, ``parquet:FILE``, ``folder:DIR``,
``manifest:DIR`` (a ``fovea curate`` output)."""
from __future__ import annotations

from fovea.data.base import ImageSource, SourceConfig
from fovea.data.sources import build_source


class SpecError(ValueError):
    """A malformed data spec (the CLI reports it with exit 2)."""


def parse_source_spec(spec: str) -> dict:
    """'fmnist:train[:DIR]' | 'parquet:FILE' | 'folder:DIR' | 'manifest:DIR' -> SourceConfig fields."""
    kind, _, rest = spec.partition(":")
    if kind == "fmnist":
        split, _, path = rest.partition(":")
        return {"kind": "fmnist", "split": split or "train", "path": path}
    if kind in ("parquet", "folder", "manifest") and rest:
        return {"kind": kind, "path": rest}
    raise SpecError(f"bad data spec {spec!r}: use fmnist:train|test[:DIR], parquet:FILE, folder:DIR or manifest:DIR")


def source_from_spec(spec: str | None, fallback: dict | None = None, limit: int = 0, seed: int | None = None,
                     what: str = "--data") -> ImageSource:
    """The image source of a command-line spec (see :func:`parse_source_spec`), or of ``fallback`` (a
    ``SourceConfig`` mapping, e.g. a run's ``data.eval_train``) when no spec is given; ``limit`` > 0 keeps
    a fixed random subset (seeded by ``seed``). Errors name ``what``."""
    from fovea.config.loader import build_section
    from fovea.errors import ConfigError
    fields = parse_source_spec(spec) if spec else fallback
    if not fields:
        raise ConfigError(f"no {what} given, and nothing to fall back on")
    cfg = build_section(SourceConfig, {k: v for k, v in fields.items() if k in SourceConfig.__dataclass_fields__}, what)
    if limit:
        cfg.limit = limit
    if seed is not None:
        cfg.seed = seed
    return build_source(cfg)
