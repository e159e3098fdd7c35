"""The iBOT masked-patch term (METHODS.md section 2): the student's masked global-crop patches predict the
teacher's targets at the same positions; one loss per head level (Matryoshka)."""
from __future__ import annotations

import torch
from typing import cast

from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.losses.dino import DINOLoss
from fovea.losses.ibot import ibot_patch_loss, masked_patch_weights
from fovea.methods.base import StepValues
from fovea.models.vit import VisionTransformer
from fovea.methods.terms.base import Outputs, Parts, StepInput, Term, teacher_targets


class IBOTTerm(Term):
    name = "ibot"

    @staticmethod
    def enabled(cfg: RunConfig) -> bool:
        return cfg.ibot.enabled

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        c = parts.cfg
        self.cfg, self.widths, self.level_weights = c, parts.widths, parts.level_weights
        self.centering = c.dino.centering if c.ibot.centering == "same" else c.ibot.centering
        self.levels = nn.ModuleList(DINOLoss(k, c.dino.student_temp, c.ibot.center_momentum)
                                    for k in parts.patch_out_dims)

    @property
    def losses(self) -> list[DINOLoss]:
        """One loss (with its EMA centre) per head level, typed."""
        return cast(list[DINOLoss], list(self.levels))

    def weight(self, sv: StepValues) -> float:
        return self.cfg.ibot.loss_weight

    def forward(self, s: Outputs, t: Outputs, x: StepInput, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        masks = x.masks
        if masks is None or s.patch_logits is None or t.patch_logits is None:
            raise ValueError("the iBOT term needs the batch's masks (ibot.enabled builds them in the data pipeline)")
        n_masked = masks.sum().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n_masked)
        weights = masked_patch_weights(masks)
        multi = len(self.levels) > 1
        logs: dict[str, Tensor] = {}
        loss = s.cls.new_zeros((), dtype=torch.float32)
        for m, (fn, t_l, s_l) in enumerate(zip(self.losses, t.patch_logits, s.patch_logits, strict=True)):
            p_patch = teacher_targets(t_l, fn, self.centering, sv.sched["teacher_temp"],
                                      self.cfg.dino.sinkhorn_iters, n_masked)
            l_m = ibot_patch_loss(s_l, p_patch, weights, masks.shape[0], self.cfg.dino.student_temp)
            loss = loss + self.level_weights[m] * l_m
            if multi:
                logs[f"loss/ibot@{self.widths[m]}"] = l_m.detach()
            if self.centering == "ema":
                fn.add_to_center(t_l)  # applied after the optimizer step: used from the next step
        logs["masked_fraction"] = masks.float().mean()
        return loss, logs

    def after_step(self, teacher_backbone: VisionTransformer, sv: StepValues) -> None:
        """The EMA centres take the step's teacher outputs (all micro-batches, all ranks)."""
        if self.centering == "ema":
            for fn in self.losses:
                fn.apply_center()
