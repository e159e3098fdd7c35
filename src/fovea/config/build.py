"""Mappings -> validated config dataclasses (no knowledge of methods, so that any layer may use it).

Unknown keys and values of the wrong type raise :class:`~fovea.errors.ConfigError` naming the key (with a
close-match suggestion); ``Literal`` fields are choices; fields marked ``metadata={"auto": True}`` read the old
``0 = auto`` as ``None``.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from fovea.errors import ConfigError


def _hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:  # a choice: the one list of its values is the type itself
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} not one of {', '.join(map(str, choices))}"
                              f"{_hint(str(value), [str(c) for c in choices])}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads 1e-3 as a string; convert only where a number is expected
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _auto_fields(cls: type) -> set[str]:
    """Fields whose ``null`` means 'auto' (or 'the value of another key'), marked ``metadata={"auto": True}``."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("auto")}


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    auto = _auto_fields(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{_hint(str(key), names)}; "
                              f"valid keys here: {', '.join(names)}")
        if key in auto and value == 0 and not isinstance(value, bool):
            value = None  # configs written before these keys were optional said 0 for 'auto'
        kwargs[key] = _convert(value, hints[key], path)
    obj = cls(**kwargs)
    return obj


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Validated dataclass ``cls`` from a mapping (unknown keys / bad types raise ConfigError)."""
    return _build(cls, data, prefix)


def legacy_tree(cls: type, tree: Any) -> Any:
    """A stored config mapping of ``cls`` with the old ``0 = auto`` values as ``None`` (what :func:`load_config`
    makes of them), so that an old run's config compares equal to the same config loaded today."""
    if not isinstance(tree, dict) or not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return tree
    hints, auto, out = typing.get_type_hints(cls), _auto_fields(cls), dict(tree)
    for key, value in tree.items():
        if key in auto and value == 0 and not isinstance(value, bool):
            out[key] = None
        elif key in hints:
            args = [a for a in typing.get_args(hints[key]) if a is not type(None)] or [hints[key]]
            out[key] = legacy_tree(args[0], value)
    return out
