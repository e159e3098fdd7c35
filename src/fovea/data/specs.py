"""Data-set specs of the command line: ``fmnist:train|test[:DIR]``, ``parquet:FILE``, ``folder:DIR``,
``manifest:DIR`` (a ``fovea curate`` output)."""
from __future__ import annotations

from fovea.data.base import ImageSource, SourceConfig, SpecError, parse_source_spec
from fovea.data.sources import build_source

__all__ = ["SpecError", "parse_source_spec", "source_from_spec"]


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
