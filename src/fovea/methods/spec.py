"""The one place a method tells the rest of fovea about itself: a :class:`MethodSpec`, registered by name.

A method module ends with ``register(MethodSpec(...))``; :mod:`fovea.methods.registry` imports the
method modules, so every name is known once it is imported. The training loop, the config loader
and the throughput benchmark only talk to the spec: none of them reads a method's config section.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

    from fovea.config.schema import RunConfig
    from fovea.core.plan import Plan
    from fovea.data.base import ImageSource
    from fovea.methods.base import Method

Schedule = Callable[[int], dict[str, float]]  # step -> the method's scheduled values at that step


def no_phase(cfg: RunConfig, plan: Plan, step: int) -> str:
    """The default data phase: one phase for the whole run."""
    return ""


def no_checks(cfg: RunConfig) -> list[str]:
    """The default cross-field check: nothing to say."""
    return []


def unchanged(cfg: RunConfig, n_images: int, world: int) -> RunConfig:
    """The default 'auto' resolution: nothing to resolve."""
    return cfg


@dataclass(frozen=True)
class MethodSpec:
    """Everything the loop, the loader and the benchmark need to know about one method.

    - ``names``: values of ``cfg.method`` that select it (the first is its own name);
    - ``sections``: the config sections it reads (listed by ``fovea train --help``);
    - ``build(cfg)``: the :class:`~fovea.methods.base.Method` (student, teacher, losses);
    - ``train_data(cfg, source, phase)``: (dataset keyed by (epoch, index), collate) for a data phase;
    - ``schedule(cfg, plan)``: a function step -> the method's own scheduled values (teacher momentum,
      temperatures, ...), given to ``training_step`` / ``after_step`` in ``StepValues.sched`` and logged;
    - ``phase(cfg, plan, step)``: the data phase at ``step`` (a new loader starts when it changes);
    - ``resolve(cfg, n_images, world)``: the config with its 'auto' values made concrete;
    - ``check(cfg)``: cross-field problems, one message each (the loader raises them before any work);
    - ``synthetic_batch(cfg, device)``: a batch of random images as the collate makes it (benchmark);
    - ``flops(cfg, batch)``: the analytic FLOPs of one training step on that batch (benchmark);
    - ``batch_augment(cfg)``: with ``crops.augment=batched``, the function the stepper applies to each whole
      batch on the device before the step (its ``train_data`` then sends undecorated images); None: the
      method's data is always augmented per image.
    """

    names: tuple[str, ...]
    sections: tuple[str, ...]
    build: Callable[[RunConfig], Method]
    train_data: Callable[[RunConfig, ImageSource, str], tuple[Dataset, Callable[[list], dict]]]
    schedule: Callable[[RunConfig, Plan], Schedule]
    synthetic_batch: Callable[[RunConfig, torch.device], dict]
    flops: Callable[[RunConfig, dict], dict[str, Any]]
    phase: Callable[[RunConfig, Plan, int], str] = no_phase
    resolve: Callable[[RunConfig, int, int], RunConfig] = unchanged
    check: Callable[[RunConfig], list[str]] = no_checks
    batch_augment: Callable[[RunConfig], Callable[[dict], dict]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` known under each of its names (a name taken by another spec is an error)."""
    for name in spec.names:
        if name in _SPECS and _SPECS[name] is not spec:
            raise ValueError(f"method name {name!r} is registered twice")
        _SPECS[name] = spec
    return spec


def registered() -> dict[str, MethodSpec]:
    """name -> spec of every method registered so far (import fovea.methods.registry to have them all)."""
    return dict(_SPECS)
