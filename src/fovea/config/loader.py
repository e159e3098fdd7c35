"""YAML presets + ``key.sub=value`` overrides -> validated dataclasses.

Unknown keys and values of the wrong type fail before any work, naming the key
(with a close-match suggestion). ``to_dict`` gives the resolved config written next to a run.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fovea.config.build import (
    _build,
    _hint,
    build_section,
    legacy_tree,
)
from fovea.config.schema import RunConfig
from fovea.errors import ConfigError

__all__ = [
    "build_section",
    "describe",
    "dump_yaml",
    "field_comments",
    "legacy_tree",
    "load_config",
    "load_tree",
    "parse_override",
    "preset_names",
    "preset_text",
    "to_dict",
    "validate",
]


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in ``fovea/presets``."""
    return sorted(p.name[:-5] for p in resources.files("fovea.presets").iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """Raw YAML of a shipped preset."""
    return resources.files("fovea.presets").joinpath(f"{name}.yaml").read_text()


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = node[p]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key, value


def load_tree(preset_or_path: str) -> dict[str, Any]:
    """Raw mapping of a preset name or a YAML file path."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {preset_or_path!r} not found")
        text = path.read_text()
        origin = str(path)
    elif preset_or_path in preset_names():
        text = preset_text(preset_or_path)
        origin = f"preset {preset_or_path}"
    else:
        raise ConfigError(f"{preset_or_path!r} is neither a preset nor a YAML file{_hint(preset_or_path, preset_names())}; "
                          f"presets: {', '.join(preset_names())}")
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: invalid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{origin}: top level must be a mapping")
    tree.setdefault("name", path.stem if origin == str(path) else preset_or_path)
    return tree


def load_config(preset_or_path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from a preset/YAML and ``key=value`` overrides."""
    tree = load_tree(preset_or_path) if preset_or_path else {}
    for ov in overrides or []:
        key, value = parse_override(ov)
        _set_path(tree, key, value)
    cfg = _build(RunConfig, tree)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that types alone cannot express: the shared ones here, the method's own from its
    spec (``MethodSpec.check``). Raises :class:`ConfigError` with the first problem."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)
    from fovea.methods.registry import METHODS, spec_for
    from fovea.models.vit import ARCHS
    need(cfg.method in METHODS, f"method: unknown method {cfg.method!r}{_hint(cfg.method, list(METHODS))}; "
         f"available: {', '.join(METHODS)}")
    need(0 <= cfg.model.drop_path_rate < 1, f"model.drop_path_rate must be within [0, 1), got {cfg.model.drop_path_rate}")
    need(all(w > 0 for w in cfg.eval.knn.widths), f"eval.knn.widths must be positive, got {cfg.eval.knn.widths}")
    need(cfg.model.arch in ARCHS, f"model.arch: unknown {cfg.model.arch!r}{_hint(cfg.model.arch, list(ARCHS))}; "
         f"choose one of {', '.join(ARCHS)}")
    p = cfg.model.patch_size
    need(p > 0, "model.patch_size must be > 0")
    for key, size in (("crops.global_size", cfg.crops.global_size), ("highres.global_size", cfg.highres.global_size or p)):
        need(size > 0 and size % p == 0, f"{key}={size} must be a positive multiple of model.patch_size={p}")
    need(cfg.model.img_size % p == 0, f"model.img_size={cfg.model.img_size} must be a multiple of patch_size={p}")
    need(cfg.data.batch_size > 0, "data.batch_size must be > 0")
    o = cfg.optim
    need(o.head_warmup_steps >= 0 and o.backbone_warmup_steps >= 0 and o.backbone_lr_mult >= 0,
         "optim.head_warmup_steps, optim.backbone_warmup_steps and optim.backbone_lr_mult must be >= 0")
    need(cfg.data.num_workers >= 0, "data.num_workers must be >= 0")
    need(re.match(r"^(auto|cpu|cuda|cuda:\d+)$", cfg.train.device) is not None,
         f"train.device: {cfg.train.device!r} is not one of auto, cpu, cuda, cuda:N")
    for key in ("global_scale", "local_scale", "ratio", "blur_sigma"):
        v = getattr(cfg.crops, key)
        need(len(v) == 2 and 0 < v[0] <= v[1], f"crops.{key} must be [low, high] with 0 < low <= high, got {v}")
    need(len(cfg.crops.blur_p) == 3, "crops.blur_p must list 3 probabilities (global 1, global 2, locals)")
    need(len(cfg.crops.color_jitter) == 4, "crops.color_jitter must be [brightness, contrast, saturation, hue]")
    need((cfg.optim.momentum_teacher is None or 0 <= cfg.optim.momentum_teacher <= 1)
         and 0 <= cfg.optim.momentum_teacher_end <= 1,
         "optim.momentum_teacher(_end) must be within [0, 1]")
    from fovea.eval.protocols import FINAL_PROTOCOLS
    bad = [p for p in cfg.eval.final if p not in FINAL_PROTOCOLS]
    need(not bad, f"eval.final: {bad} not among {', '.join(FINAL_PROTOCOLS)}")
    problems = spec_for(cfg.method).check(cfg)
    need(not problems, "; ".join(problems))


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain dict (for YAML / checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    """Resolved config as YAML text; loading it back gives an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in a dataclass's source (its help text)."""
    import inspect
    import re
    out: dict[str, str] = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return out
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf key, for ``--help`` listings."""
    rows: list[tuple[str, str, str, str]] = []
    hints = typing.get_type_hints(cls)
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and args else tp
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            rows.extend(describe(inner, key + "."))
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kind = "choice" if typing.get_origin(inner) is typing.Literal else getattr(inner, "__name__", str(inner))
        rows.append((key, kind, repr(default), helps.get(f.name, "")))
    return rows
