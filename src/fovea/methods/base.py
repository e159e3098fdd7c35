"""What the training loop needs from a method: :class:`Method` and the per-step :class:`StepValues`."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.core.plan import Plan
from fovea.core.schedules import auto_momentum, ema_momentum
from fovea.data.loader import EpochBatchSampler
from fovea.models.vit import VisionTransformer


M = TypeVar("M", bound=nn.Module)


@dataclass
class StepValues:
    """Scheduled values for one iteration. The loop computes the optimizer's (lr, weight decay); the
    method's own values (teacher momentum, temperatures, loss weights ...) come from its spec's
    ``schedule`` and are in ``sched`` (all of them are logged)."""

    step: int
    epoch: float
    lr: float
    weight_decay: float
    sched: dict[str, float] = field(default_factory=dict)
    heads_only: bool = False  # head warm-up of continued pretraining: only fresh heads learn on the frozen backbone


class Method(nn.Module):
    """A method turns a batch into named losses and keeps its teachers; it does not own the loop.

    Subclasses define ``student`` (the trained module, possibly wrapped in DDP by the loop),
    ``training_step``, ``after_step`` and ``eval_backbone``; ``after_backward`` may edit gradients.
    """

    student: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_student_fwd"] = None  # DDP wrapper, kept out of the module tree/state_dict

    def set_student_wrapper(self, wrapped: nn.Module | None) -> None:
        """Route the student's forward through ``wrapped`` (e.g. DistributedDataParallel)."""
        self.__dict__["_student_fwd"] = wrapped

    @property
    def student_fwd(self) -> nn.Module:
        return self.__dict__["_student_fwd"] or self.student

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        """Return (total loss to back-propagate, scalars to log)."""
        raise NotImplementedError

    def after_backward(self, sv: StepValues) -> None:
        """Called between the backward and the gradient clipping (e.g. drop the prototypes' gradients)."""

    @torch.no_grad()
    def after_step(self, sv: StepValues) -> None:
        """Called after each optimizer step: EMA teachers, snapshots."""

    def eval_backbone(self) -> VisionTransformer:
        """The backbone to evaluate/export (the teacher's, for self-distillation)."""
        raise NotImplementedError

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Trainable parameters of each sub-module of the student (``optim.clip_mode=per_module``):
        one group per direct child (DINO family: backbone, DINO head, iBOT head; I-JEPA: encoder,
        predictor), plus one of the student's own parameters when it has any."""
        groups = [[p for p in m.parameters() if p.requires_grad] for m in self.student.children()]
        own = [p for p in self.student.parameters(recurse=False) if p.requires_grad]
        return [g for g in groups + [own] if g]


def frozen_copy(module: M) -> M:
    """A separate deep copy of ``module`` (never aliased) to hold a teacher: no stochastic depth in its blocks,
    no gradients, eval mode."""
    from fovea.models.layers import Block
    out = copy.deepcopy(module)
    for blk in out.modules():
        if isinstance(blk, Block):
            blk.drop_path_rate = 0.0
    for p in out.parameters():
        p.requires_grad_(False)
    return out.eval()


class EMABackbone(nn.Module):
    """Holds an EMA backbone under the name ``backbone`` (checkpoint keys ``teacher.backbone.*``): I-JEPA's
    target encoder, the distilled student's EMA."""

    backbone: VisionTransformer

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (same order); on the
    local shards when both are sharded (FSDP shards a teacher and its student alike)."""
    from fovea.train.sharding import local
    s = [local(p.detach()) for p in student.parameters()]
    t: list[Tensor] = [local(p) for p in teacher.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def ema_schedule_value(cfg: RunConfig, plan: Plan, step: int) -> float:
    """The teacher EMA momentum at ``step``: ``optim.momentum_teacher`` -> ``optim.momentum_teacher_end``
    over the run, cosine (DINO) or linear (I-JEPA) by ``optim.momentum_schedule``."""
    o = cfg.optim
    if o.momentum_teacher is None:
        raise ValueError("optim.momentum_teacher=null (auto) must be resolved first (the method spec's resolve)")
    return ema_momentum(step, plan.total_steps, o.momentum_teacher, o.momentum_teacher_end, o.momentum_schedule)


def resolve_momentum(cfg: RunConfig, n_images: int, world: int) -> RunConfig:
    """``optim.momentum_teacher=null`` (auto) -> :func:`~fovea.core.schedules.auto_momentum` of the run length."""
    if cfg.optim.momentum_teacher is not None:
        return cfg
    cfg = copy.deepcopy(cfg)
    spe = max(EpochBatchSampler.steps_per_epoch(n_images, cfg.data.batch_size, world), 1)
    cfg.optim.momentum_teacher = auto_momentum(cfg.optim.max_steps or round(cfg.optim.epochs * spe))
    return cfg
