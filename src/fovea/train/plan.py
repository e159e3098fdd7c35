"""The run's plan (step counts) and the optimizer's scheduled values; the method's own come from its spec."""
from __future__ import annotations

from fovea.config.schema import RunConfig
from fovea.core.plan import Plan
from fovea.core.schedules import cosine_schedule
from fovea.data.loader import EpochBatchSampler
from fovea.methods.base import StepValues
from fovea.methods.registry import spec_for
from fovea.methods.spec import Schedule
from fovea.train.optim import scaled_lr

__all__ = ["Plan", "make_plan", "resolve_auto", "step_batch", "step_values"]


def step_batch(cfg: RunConfig) -> int:
    """Images per rank and optimizer step: ``data.batch_size`` x ``train.accumulate`` (the loader's batch, cut
    into ``train.accumulate`` micro-batches by the stepper)."""
    return cfg.data.batch_size * cfg.train.accumulate


def make_plan(cfg: RunConfig, n_images: int, world: int) -> Plan:
    """Turn epoch-based durations into step counts for this data set and world size."""
    per_rank = step_batch(cfg)
    spe = EpochBatchSampler.steps_per_epoch(n_images, per_rank, world)
    if spe == 0:
        raise ValueError(f"data set has {n_images} images, fewer than one global batch "
                         f"({cfg.data.batch_size} x {world} ranks x {cfg.train.accumulate} accumulated); lower "
                         "data.batch_size or train.accumulate")
    o = cfg.optim
    unit = o.epoch_length or spe  # steps per schedule "epoch" (DINOv2 counts 1250-step epochs)
    total = o.max_steps or max(1, round(o.epochs * unit))
    ep = lambda e: int(round(e * unit))  # noqa: E731
    return Plan(spe, total, min(ep(o.warmup_epochs), total), cfg.train.checkpoint_every_steps or spe,
                cfg.eval.every_steps or ep(cfg.eval.every_epochs), scaled_lr(o, per_rank * world), unit)


def resolve_auto(cfg: RunConfig, n_images: int, world: int) -> RunConfig:
    """Replace the method's 'auto' values by concrete ones, so the written config.yaml is explicit
    (a new config; the input is not modified)."""
    return spec_for(cfg.method).resolve(cfg, n_images, world)


def method_schedule(cfg: RunConfig, plan: Plan) -> Schedule:
    """step -> the method's own scheduled values (its spec's ``schedule``)."""
    return spec_for(cfg.method).schedule(cfg, plan)


def step_values(cfg: RunConfig, plan: Plan, step: int, sched: Schedule | None = None,
                heads_only: bool = False) -> StepValues:
    """All scheduled values at ``step`` (per-iteration schedules, METHODS.md section 0): lr (warm-up from
    ``optim.start_lr``, then cosine to ``optim.min_lr``), weight decay (cosine), and the method's values."""
    o = cfg.optim
    start_lr = o.start_lr * plan.peak_lr / o.lr if o.lr else 0.0  # scaled like the peak lr
    sched = sched or method_schedule(cfg, plan)
    return StepValues(
        step=step, epoch=step / plan.steps_per_epoch,
        lr=cosine_schedule(step, plan.total_steps, plan.peak_lr, o.min_lr, plan.warmup_steps, start_lr),
        weight_decay=cosine_schedule(step, plan.total_steps, o.weight_decay, o.weight_decay_end),
        sched=sched(step), heads_only=heads_only)
