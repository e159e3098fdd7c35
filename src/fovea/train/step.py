"""One optimizer step, with everything it needs and nothing of the run folder: the benchmark and the
training loop build it with :func:`build_stepper`."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from fovea.config.schema import RunConfig
from fovea.core.batch import split_batch, to_device
from fovea.core.distributed import DistInfo, any_rank
from fovea.core.plan import Plan
from fovea.methods.base import Method, StepValues
from fovea.methods.registry import spec_for
from fovea.methods.spec import MethodSpec, Schedule
from fovea.train.init_from import backbone_scale
from fovea.train.optim import apply_hparams, build_optimizer, clip_gradients
from fovea.train.plan import method_schedule, step_values
from fovea.train.sharding import apply_fsdp, reshard_all, resolve_strategy, set_gradient_sync


class NonFiniteLoss(FloatingPointError):
    """A loss term became NaN or infinite; nothing of that step was applied or saved."""


@dataclass
class Stepper:
    """A method with its optimizer and schedules: :meth:`step` runs one training step on a batch."""

    cfg: RunConfig
    spec: MethodSpec
    method: Method
    optimizer: torch.optim.Optimizer
    plan: Plan
    sched: Schedule
    device: torch.device
    info: DistInfo
    bf16: bool
    head_warmup: int = 0  # steps of the continued-pretraining head warm-up (fresh heads, frozen backbone)
    fp16: bool = False  # float16 autocast with a gradient scaler (train.precision=fp16)
    fsdp: bool = False  # the method is sharded (train.strategy=fsdp)
    augment: Callable[[dict], dict] | None = None  # crops.augment=batched: whole batch on the device -> its crops

    def __post_init__(self) -> None:
        self.params = [p for p in self.method.student.parameters() if p.requires_grad]
        self.clip_groups = self.method.clip_groups()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.fp16 else None

    def values(self, step: int) -> StepValues:
        return step_values(self.cfg, self.plan, step, self.sched, heads_only=step < self.head_warmup)

    def step(self, batch: dict, sv: StepValues, context: Callable[[], str] | None = None) -> dict[str, float]:
        """One optimizer step on ``batch`` (cut into ``train.accumulate`` micro-batches whose gradients add
        up); returns the logged scalars of this rank (means over the micro-batches). ``context()`` ends the
        message of :class:`NonFiniteLoss` (what happened to the checkpoints)."""
        o, n = self.cfg.optim, self.cfg.train.accumulate
        apply_hparams(self.optimizer, sv.lr, sv.weight_decay,
                      backbone_scale(sv.step, self.head_warmup, o.backbone_warmup_steps, o.backbone_lr_mult))
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        wrapped = self.method.student_fwd
        ddp = wrapped if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) else None
        if self.augment is not None:  # the whole batch, so the micro-batches are cut from augmented crops
            batch = self.augment({k: to_device(v, self.device) for k, v in batch.items()})
        for i, micro in enumerate(split_batch(batch, n)):
            micro = {k: to_device(v, self.device) for k, v in micro.items()}
            if self.fsdp and n > 1:
                set_gradient_sync(self.method.student, i == n - 1)
            # DDP / FSDP: reduce the gradients once, with the last micro-batch
            with ddp.no_sync() if ddp is not None and i < n - 1 else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.float16 if self.fp16 else torch.bfloat16,
                                    enabled=self.bf16 or self.fp16):
                    loss, logs = self.method.training_step(micro, sv)
                self.check_finite(loss, logs, sv.step, context)
                scaled = loss / n if n > 1 else loss
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clipping and after_backward see the true gradients
        self.method.after_backward(sv)
        gnorm = clip_gradients(self.params, o.clip_grad, o.clip_mode, self.clip_groups)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
            sums["amp_scale"] = float(self.scaler.get_scale())
        else:
            self.optimizer.step()
        if self.fsdp:
            reshard_all(self.method)  # the EMA and the snapshots work on the shards
        self.method.after_step(sv)
        sums.update({"grad_norm": gnorm, "lr": sv.lr, "wd": sv.weight_decay, **sv.sched})
        return sums

    def check_finite(self, loss: torch.Tensor, logs: dict, step: int, context: Callable[[], str] | None) -> None:
        """Raise :class:`NonFiniteLoss` naming the step and every non-finite loss term (on every rank when
        any rank has one, so no rank waits in the backward's all-reduce); nothing is applied or saved."""
        terms = {k: v for k, v in logs.items() if k.startswith("loss/") and isinstance(v, torch.Tensor)}
        vals = torch.stack([loss.detach().float().reshape(())] + [v.detach().float().reshape(()) for v in terms.values()])
        bad = not bool(torch.isfinite(vals).all())
        if not any_rank(bad, self.info):
            return
        named = [f"{k}={float(v):g}" for k, v in terms.items() if not torch.isfinite(v).all()]
        if len(named) > 1:  # the total follows from its terms
            named = [n for n in named if not n.startswith("loss/total=")]
        what = ", ".join(named) if named else (f"total loss={float(loss):g}" if bad else "on another rank")
        raise NonFiniteLoss(f"non-finite loss at step {step + 1}/{self.plan.total_steps}: {what}; "
                            f"nothing of this step was applied{context() if context else ''}. Lower optim.lr, raise "
                            "dino.teacher_temp, or use train.precision=fp32")


def build_stepper(cfg: RunConfig, plan: Plan, device: torch.device, info: DistInfo | None = None,
                  method: Method | None = None) -> Stepper:
    """The stepper of ``cfg`` (auto values resolved): the method built from the train seed (or ``method``,
    already built and moved), its optimizer and schedules, on ``device``; with ``crops.augment=batched`` (and a
    method with a batched augmentation: the DINO family) it crops each batch on ``device`` first."""
    spec = spec_for(cfg.method)
    if method is None:
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        method = spec.build(cfg).to(device)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    info = info or DistInfo()
    fsdp = resolve_strategy(cfg.train.strategy, info.world) == "fsdp"
    if fsdp:
        apply_fsdp(method, device, bf16)  # before the optimizer: it holds the sharded parameters
    from fovea.models.layers import Block
    blocks = [m for m in method.student.modules() if isinstance(m, Block)]
    for blk in blocks:
        blk.checkpointing = cfg.train.activation_checkpointing
    if cfg.train.compile:
        for blk in blocks:
            blk.compile()  # per block: the same compiled code serves every crop size after a recompile or two
    augment = spec.batch_augment(cfg) if cfg.crops.augment == "batched" and spec.batch_augment is not None else None
    return Stepper(cfg, spec, method, build_optimizer(method.student, cfg.optim), plan, method_schedule(cfg, plan),
                   device, info, bf16, fp16=cfg.train.precision == "fp16", fsdp=fsdp, augment=augment)
