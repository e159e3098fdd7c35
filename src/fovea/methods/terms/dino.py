"""The DINO CLS term (METHODS.md sections 1 and 3): teacher global crops vs every other student crop,
one loss per head level (Matryoshka, section 4), weighted sum."""
from __future__ import annotations

import torch
from typing import cast

from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.losses.dino import DINOLoss, cross_view_loss
from fovea.methods.base import StepValues
from fovea.models.vit import VisionTransformer
from fovea.methods.terms.base import Outputs, Parts, StepInput, Term, teacher_targets


def collapse_stats(p_t: Tensor) -> dict[str, Tensor]:
    """Collapse diagnostics of teacher probabilities [N, K].

    ``teacher_entropy`` (mean per-sample entropy) near ln K means uniform collapse;
    ``teacher_batch_entropy`` (entropy of the batch-mean distribution) near 0 means all samples
    pick one prototype. Healthy training keeps the first well below and the second near ln K.
    """
    ent = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p_t.mean(0)
    return {"diag/teacher_entropy": ent, "diag/teacher_batch_entropy": -(mean * mean.clamp_min(1e-12).log()).sum()}


class DINOTerm(Term):
    name = "dino"

    @staticmethod
    def enabled(cfg: RunConfig) -> bool:
        return True

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        d = parts.cfg.dino
        self.cfg, self.widths, self.level_weights = parts.cfg, parts.widths, parts.level_weights
        self.levels = nn.ModuleList(DINOLoss(k, d.student_temp, d.center_momentum) for k in parts.cls_out_dims)

    @property
    def losses(self) -> list[DINOLoss]:
        """One loss (with its EMA centre) per head level, typed."""
        return cast(list[DINOLoss], list(self.levels))

    def weight(self, sv: StepValues) -> float:
        return self.cfg.dino.loss_weight

    def forward(self, s: Outputs, t: Outputs, x: StepInput, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        d = self.cfg.dino
        logs: dict[str, Tensor] = {}
        loss = s.cls.new_zeros((), dtype=torch.float32)
        last, multi = len(self.levels) - 1, len(self.levels) > 1
        for m, (fn, t_l, s_l) in enumerate(zip(self.losses, t.cls_logits, s.cls_logits, strict=True)):
            p_t = teacher_targets(t_l, fn, d.centering, sv.sched["teacher_temp"], d.sinkhorn_iters)
            l_m = cross_view_loss(s_l, p_t, 2, d.student_temp)
            loss = loss + self.level_weights[m] * l_m
            if multi:
                logs[f"loss/dino@{self.widths[m]}"] = l_m.detach()
            if m == last:  # collapse diagnostics of the full-width level
                logs.update(collapse_stats(p_t.detach()))
            if d.centering == "ema":
                fn.add_to_center(t_l)  # applied after the optimizer step: used from the next step
        return loss, logs

    def after_step(self, teacher_backbone: VisionTransformer, sv: StepValues) -> None:
        """The EMA centres take the step's teacher outputs (all micro-batches, all ranks)."""
        if self.cfg.dino.centering == "ema":
            for fn in self.losses:
                fn.apply_center()
