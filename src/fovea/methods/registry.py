"""Every method by name (``cfg.method``). Importing this module registers them all; a new method is one
module ending with ``register(MethodSpec(...))`` and one import line below."""
from __future__ import annotations

from fovea.methods import dino_spec, distill, ijepa  # noqa: F401  (each registers its MethodSpec)
from fovea.methods.spec import MethodSpec, registered

METHODS: tuple[str, ...] = tuple(registered())


def spec_for(name: str) -> MethodSpec:
    """The spec registered under ``name`` (ValueError naming the known methods otherwise)."""
    specs = registered()
    if name not in specs:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(specs)}")
    return specs[name]
