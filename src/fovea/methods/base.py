"""What the training loop needs from a method."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class StepValues:
    """Scheduled values for one iteration, computed by the loop."""

    step: int
    epoch: float
    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool


class Method(nn.Module):
    """A method turns a batch into named losses and updates its teacher; it does not own the loop.

    Subclasses define ``student`` (the trained module, possibly wrapped in DDP by the loop),
    ``training_step``, ``update_teacher`` and ``eval_backbone``.
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

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, float]]:
        """Return (total loss to back-propagate, scalars to log)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA update of the teacher after an optimizer step."""
        raise NotImplementedError

    def eval_backbone(self) -> nn.Module:
        """The backbone to evaluate/export (the teacher's, for self-distillation)."""
        raise NotImplementedError

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Trainable parameters of each sub-module of the student (``optim.clip_mode=per_module``):
        one group per direct child (DINO family: backbone, DINO head, iBOT head; I-JEPA: encoder,
        predictor), plus one of the student's own parameters when it has any."""
        groups = [[p for p in m.parameters() if p.requires_grad] for m in self.student.children()]
        own = [p for p in self.student.parameters(recurse=False) if p.requires_grad]
        return [g for g in groups + [own] if g]

    def last_layer_params(self) -> list[nn.Parameter]:
        """Parameters frozen during the 'freeze last layer' phase."""
        return []
