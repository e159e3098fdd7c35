"""Gram anchoring (DINOv3, METHODS.md section 5b): the student's global-crop patch similarities are pulled
towards those of a frozen "Gram teacher", a snapshot of the EMA teacher's backbone taken at ``gram.start``
and refreshed every ``gram.refresh_every`` steps after it. The Gram teacher may see the same crops at a
larger size (``gram.teacher_size``); its patch grid is then resized bicubically to the student's."""
from __future__ import annotations


import torch
from torch import Tensor

from fovea.config.schema import RunConfig
from fovea.losses.gram import gram_loss, resize_patch_grid
from fovea.methods.base import StepValues, frozen_copy
from fovea.methods.terms.base import Outputs, Parts, StepInput, Term
from fovea.models.vit import VisionTransformer


def gram_weight(cfg: RunConfig, step: int, highres: bool) -> float:
    """Weight of the term at ``step``: 0 before ``gram.start``, then ``gram.weight`` (``gram.highres_weight``
    in the high-resolution phase when it is set)."""
    g = cfg.gram
    if step < g.start:
        return 0.0
    return g.highres_weight if highres and g.highres_weight is not None else g.weight


def refreshes_after(cfg: RunConfig, step: int) -> bool:
    """True when the Gram teacher is (re)taken from the EMA teacher after optimizer step ``step``
    (0-based), i.e. before step ``step + 1`` runs: at ``gram.start`` and every ``gram.refresh_every`` after."""
    g, nxt = cfg.gram, step + 1
    return nxt == g.start or (g.refresh_every > 0 and nxt > g.start and (nxt - g.start) % g.refresh_every == 0)


class GramTerm(Term):
    """The snapshot ``teacher`` is saved with the checkpoint; ``taken`` records whether it has been taken from
    the EMA teacher yet (with ``gram.start=0`` it is taken at the first step, after ``train.init_from`` loaded
    the weights)."""

    name = "gram"
    taken: Tensor

    @staticmethod
    def enabled(cfg: RunConfig) -> bool:
        return cfg.gram.enabled

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.cfg = parts.cfg
        self.teacher = frozen_copy(parts.teacher_backbone)  # the snapshot (saved with the checkpoint)
        self.__dict__["ema_teacher"] = parts.teacher_backbone  # a reference, kept out of the module tree
        self.register_buffer("taken", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def snapshot(self, teacher_backbone: VisionTransformer) -> None:
        """Take the Gram teacher from the EMA teacher's backbone now."""
        self.teacher.load_state_dict(teacher_backbone.state_dict())
        self.taken.fill_(True)

    def train(self, mode: bool = True) -> "GramTerm":
        super().train(mode)
        self.teacher.eval()  # a frozen snapshot: never in training mode
        return self

    def weight(self, sv: StepValues) -> float:
        return sv.sched["gram_weight"]

    def forward(self, s: Outputs, t: Outputs, x: StepInput, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        if self.weight(sv) == 0:  # before gram.start: no Gram-teacher forward at all
            return s.patches.new_zeros((), dtype=torch.float32), {}
        if not bool(self.taken):
            self.snapshot(self.__dict__["ema_teacher"])
        crops = x.gram_crops or x.crops[:2]
        with torch.no_grad():
            outs = self.teacher.forward_features_list(crops)
            g = torch.cat([o.patches for o in outs])  # [2B, Ng, D]
        p = self.teacher.patch_size
        h, w = x.crops[0].shape[-2] // p, x.crops[0].shape[-1] // p
        g = resize_patch_grid(g, crops[0].shape[-2] // p, crops[0].shape[-1] // p, h, w)
        return gram_loss(s.patches, g), {}

    @torch.no_grad()
    def after_step(self, teacher_backbone: VisionTransformer, sv: StepValues) -> None:
        if refreshes_after(self.cfg, sv.step):
            self.snapshot(teacher_backbone)
