"""The self-distillation family: DINO, iBOT, DINOv2, Franca and DINOv3's Gram anchoring as one method whose
config selects the parts (METHODS.md 0-5b).

The step computes the teacher's and the student's :class:`~fovea.methods.terms.Outputs` once, then sums
the enabled terms of :mod:`fovea.methods.terms` (``dino``, ``ibot``, ``koleo``, ``gram``), each a small
module returning (loss, logs). Every head returns a list of levels (one level without Matryoshka).
``method: dinov2`` / ``franca`` / ``dinov3`` are the same class; the names label presets. The spec
(data pipeline, schedules, checks, benchmark hooks) is in :mod:`fovea.methods.dino_spec`.
"""
from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.data.augment import normalize
from fovea.methods.base import Method, StepValues, ema_update, frozen_copy
from fovea.methods.terms import TERMS, Outputs, Parts, StepInput, Term, sum_terms
from fovea.models.heads import DINOHead
from fovea.models.matryoshka import MatryoshkaHead, nesting_widths
from fovea.models.vit import VisionTransformer


Head = DINOHead | MatryoshkaHead


class Student(nn.Module):
    """Backbone + DINO head (+ iBOT patch head). Also the teacher's architecture.

    ``forward(crops, masks, select)`` -> (CLS logits per level [n_crops*B, K_m], backbone CLS [n_crops*B, D],
    patch logits per level [M, K_p] or None, backbone patch tokens of the 2 global crops [2B, Np, D]).
    ``masks`` (bool [2B, Np]) replaces the global crops' masked patches by the mask token (student);
    ``select`` (bool [2B, Np]) picks the global-crop patch tokens sent to the patch head (student: its masked
    patches; teacher: the same positions of its unmasked crops); M = select.sum(). ``patch_head`` is
    ``head`` itself when the head is shared.
    """

    backbone: VisionTransformer
    head: Head
    patch_head: Head | None

    def __init__(self, backbone: VisionTransformer, head: Head, patch_head: Head | None = None,
                 shared_head: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.shared_head = shared_head

    def forward(self, crops: list[Tensor], masks: Tensor | None = None, select: Tensor | None = None
                ) -> tuple[list[Tensor], Tensor, list[Tensor] | None, Tensor]:
        b = crops[0].shape[0]
        in_masks = None if masks is None else [masks[:b], masks[b:2 * b]] + [None] * (len(crops) - 2)
        outs = self.backbone.forward_features_list(crops, in_masks)
        cls = torch.cat([o.cls for o in outs if o.cls is not None])
        logits = self.head(cls)
        patches = torch.cat([outs[0].patches, outs[1].patches])
        head_p = self.head if self.shared_head else self.patch_head
        if select is None or head_p is None:
            return logits, cls, None, patches
        if bool(select.any()):
            return logits, cls, head_p(patches[select]), patches
        # no masked patch on this rank: keep the patch head in the graph (zero gradients, DDP-safe)
        return logits, cls, [e[:0] for e in head_p(patches[:1, 0])], patches



def build_heads(cfg: RunConfig, embed_dim: int) -> tuple[Head, Head | None, list[int]]:
    """(DINO head, separate iBOT head or None, level widths) for a backbone of width ``embed_dim``, as the
    ``dino`` / ``ibot`` / ``matryoshka`` sections say (one level without Matryoshka)."""
    d, ib, mt = cfg.dino, cfg.ibot, cfg.matryoshka
    if d.out_dim is None:
        raise ValueError("dino.out_dim=null (auto) must be resolved first (fovea.methods.dino_spec.resolve)")
    widths = nesting_widths(embed_dim, mt.widths) if mt.enabled else [embed_dim]

    def make_head(k: int, hidden: int, bottleneck: int) -> Head:
        if mt.enabled:
            return MatryoshkaHead(embed_dim, k, widths, hidden, bottleneck, d.nlayers, d.norm_last_layer, d.use_bn,
                                  mt.l2_norm, mt.input)
        return DINOHead(embed_dim, k, hidden, bottleneck, d.nlayers, d.norm_last_layer, d.use_bn)

    head = make_head(d.out_dim, d.hidden_dim, d.bottleneck_dim)
    patch_head = None
    if ib.enabled and ib.separate_head:
        patch_head = make_head(ib.out_dim or d.out_dim, ib.hidden_dim or d.hidden_dim,
                               ib.bottleneck_dim or d.bottleneck_dim)
    return head, patch_head, widths


def head_parts(cfg: RunConfig, widths: list[int], head: Head, patch_head: Head | None,
               teacher_backbone: VisionTransformer) -> Parts:
    """What the loss terms are built from: the level widths and weights (``matryoshka.loss_weights``, 1 each
    by default) and the prototypes of the heads."""
    mt = cfg.matryoshka
    level_weights = list(mt.loss_weights) if mt.enabled and mt.loss_weights else [1.0] * len(widths)
    if len(level_weights) != len(widths):
        raise ValueError(f"matryoshka.loss_weights: {len(level_weights)} weights for {len(widths)} levels {widths}")
    return Parts(cfg, widths, level_weights, head.out_dims, (patch_head or head).out_dims, teacher_backbone)


_LEGACY = ((re.compile(r"^loss_fn\.center$"), "terms.dino.levels.0.center"),
           (re.compile(r"^loss_fn\.(\d+)\.center$"), r"terms.dino.levels.\1.center"),
           (re.compile(r"^patch_loss_fn\.center$"), "terms.ibot.levels.0.center"),
           (re.compile(r"^patch_loss_fn\.(\d+)\.center$"), r"terms.ibot.levels.\1.center"))


class DINO(Method):
    """Self-distillation method (DINO / iBOT / DINOv2 / Franca / DINOv3 parts by config).

    A batch is ``{"crops": [global1, global2, local...]}`` of uint8 [B,3,S,S], plus ``"masks"`` bool
    [2B, Np] (global crop 1 rows, then global crop 2) when ``ibot.enabled``, and the Gram teacher's two
    larger global crops at the end of ``crops`` when ``gram.teacher_size`` is set.
    """

    student: Student
    teacher: Student

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = VisionTransformer(cfg.model)
        ib = cfg.ibot
        head, patch_head, self.widths = build_heads(cfg, backbone.embed_dim)
        # Without iBOT the inputs are never masked: the mask token takes no part (and must not, for DDP).
        backbone.mask_token.requires_grad_(ib.enabled)
        self.student = Student(backbone, head, patch_head, shared_head=ib.enabled and not ib.separate_head)
        self.teacher = frozen_copy(self.student)
        parts = head_parts(cfg, self.widths, head, patch_head, self.teacher.backbone)
        self.terms = nn.ModuleDict({t.name: t(parts) for t in TERMS if t.enabled(cfg)})
        self.register_load_state_dict_pre_hook(self._legacy_keys)

    @staticmethod
    def _legacy_keys(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints written before the terms had their own modules kept the centres as ``loss_fn.*``."""
        for key in [k for k in state if k.startswith(prefix)]:
            rel = key[len(prefix):]
            for pat, new in _LEGACY:
                if pat.match(rel):
                    state[prefix + pat.sub(new, rel)] = state.pop(key)

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher.eval()  # the teacher always stays in eval mode (no drop-path) ...
        heads = [self.teacher.head] + ([self.teacher.patch_head] if self.teacher.patch_head is not None else [])
        for m in (m for h in heads for m in h.modules()):  # ... except the BatchNorm of both heads, which
            if isinstance(m, nn.BatchNorm1d):               # normalises with batch statistics as in official
                m.train(mode)                                # DINO (running stats are not EMA'd)
        return self

    def step_input(self, batch: dict) -> StepInput:
        """Normalised crops (and the Gram teacher's larger crops, when the data pipeline adds them)."""
        c = self.cfg.crops
        crops = [normalize(x, c.mean, c.std) for x in batch["crops"]]
        gram = None
        if "gram" in self.terms and self.cfg.gram.teacher_size:
            crops, gram = crops[:-2], crops[-2:]
        return StepInput(crops, batch.get("masks") if "ibot" in self.terms else None, gram)

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.step_input(batch)
        with torch.no_grad():
            t = Outputs(*self.teacher(x.crops[:2], None, x.masks))
        s = Outputs(*self.student_fwd(x.crops, x.masks, x.masks))
        return sum_terms(self.terms, s, t, x, sv)  # the dino term is always on

    def after_backward(self, sv: StepValues) -> None:
        if sv.sched.get("freeze_last_layer"):  # the prototypes get no update in the first epoch(s)
            for p in self.last_layer_params():
                p.grad = None

    @torch.no_grad()
    def after_step(self, sv: StepValues) -> None:
        momentum = sv.sched["momentum"]
        if sv.heads_only:  # head warm-up (continued pretraining): the backbones are equal and frozen; the
            # teacher's heads follow the student's by the usual EMA, or are copied (head_warmup_teacher=student)
            m = 0.0 if self.cfg.optim.head_warmup_teacher == "student" else momentum
            ema_update(self.teacher.head, self.student.head, m)
            if self.teacher.patch_head is not None and self.student.patch_head is not None:
                ema_update(self.teacher.patch_head, self.student.patch_head, m)
        else:
            ema_update(self.teacher, self.student, momentum)
        for _, term in self.term_list():
            term.after_step(self.teacher.backbone, sv)

    def term_list(self) -> list[tuple[str, Term]]:
        """The enabled loss terms in summation order, typed."""
        return [(name, cast(Term, term)) for name, term in self.terms.items()]

    def eval_backbone(self) -> VisionTransformer:
        return self.teacher.backbone

    def last_layer_params(self) -> list[nn.Parameter]:
        return last_layer_params(self.student)


def last_layer_params(student: Student) -> list[nn.Parameter]:
    """The prototypes of the student's heads (frozen during "freeze last layer")."""
    heads = [student.head] + ([student.patch_head] if student.patch_head is not None else [])
    return [p for h in heads for layer in h.last_layer_modules for p in layer.parameters()]
