"""The self-distillation family: DINO, iBOT, DINOv2 as one method whose config selects parts.

DINO (METHODS.md 0-1): EMA teacher, centred and sharpened CLS targets, multi-crop. Switched on by
config: ``ibot.enabled`` (masked-patch loss, section 2), ``dino.centering=sinkhorn`` /
``ibot.centering`` (Sinkhorn-Knopp targets), ``koleo.weight`` (KoLeo on the student's backbone CLS), ``matryoshka.enabled`` (nested heads, Franca section 4).
``method: dinov2`` / ``franca`` are the same class; the names only label presets that switch these parts on.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.data.augment import normalize
from fovea.losses.dino import DINOLoss, cross_view_loss
from fovea.losses.ibot import ibot_patch_loss, masked_patch_weights
from fovea.losses.koleo import koleo_loss
from fovea.losses.sinkhorn import sinkhorn_knopp
from fovea.methods.base import Method, StepValues
from fovea.models.heads import DINOHead
from fovea.models.matryoshka import MatryoshkaHead, nesting_widths
from fovea.models.vit import VisionTransformer


class Student(nn.Module):
    """Backbone + DINO head (+ iBOT patch head). Also the teacher's architecture.

    ``forward(crops)`` -> (CLS logits [n_crops*B, K], CLS [n_crops*B, D]);
    ``forward(crops, masks, select)`` -> the same plus patch logits [M, K_p] (M = select.sum()). ``masks`` (bool [2B, Np]) replaces the global crops' masked patches
    by the mask token (student); ``select`` (bool [2B, Np]) picks the global-crop patch tokens sent to
    the patch head (student: its masked patches; teacher: the same positions of its unmasked crops).
    ``patch_head`` is ``head`` itself when the head is shared. With Matryoshka heads every logits
    output is a list of per-level logits (narrowest level first) instead of one tensor.
    """

    def __init__(self, backbone: VisionTransformer, head: nn.Module, patch_head: nn.Module | None = None,
                 shared_head: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.patch_head = patch_head
        self.shared_head = shared_head

    def forward(self, crops: list[Tensor], masks: Tensor | None = None, select: Tensor | None = None
                ) -> tuple[Tensor, ...]:
        b = crops[0].shape[0]
        in_masks = None if masks is None else [masks[:b], masks[b:2 * b]] + [None] * (len(crops) - 2)
        outs = self.backbone.forward_features_list(crops, in_masks)
        cls = torch.cat([o["x_norm_clstoken"] for o in outs])  # type: ignore[misc]
        logits = self.head(cls)
        head_p = self.head if self.shared_head else self.patch_head
        if select is None or head_p is None:
            return logits, cls
        patches = torch.cat([outs[0]["x_norm_patchtokens"], outs[1]["x_norm_patchtokens"]])  # type: ignore[list-item]
        if bool(select.any()):
            return logits, cls, head_p(patches[select])
        # no masked patch on this rank: keep the patch head in the graph (zero gradients, DDP-safe)
        empty = head_p(patches[:1, 0])
        return logits, cls, [e[:0] for e in empty] if isinstance(empty, list) else empty[:0]


def as_levels(x: Tensor | list[Tensor]) -> list[Tensor]:
    """Head output -> list of per-level logits (a plain head is one level)."""
    return x if isinstance(x, list) else [x]


def collapse_stats(p_t: Tensor) -> dict[str, Tensor]:
    """Collapse diagnostics of teacher probabilities [N, K].

    ``teacher_entropy`` (mean per-sample entropy) near ln K means uniform collapse;
    ``teacher_batch_entropy`` (entropy of the batch-mean distribution) near 0 means all samples
    pick one prototype. Healthy training keeps the first well below and the second near ln K.
    """
    ent = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1).mean()
    mean = p_t.mean(0)
    return {"diag/teacher_entropy": ent, "diag/teacher_batch_entropy": -(mean * mean.clamp_min(1e-12).log()).sum()}


class DINO(Method):
    """Self-distillation method (DINO / iBOT / DINOv2 parts by config).

    A batch is ``{"crops": [global1, global2, local...]}`` of uint8 [B,3,S,S], plus ``"masks"`` bool
    [2B, Np] (global crop 1 rows, then global crop 2) when ``ibot.enabled``.
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = VisionTransformer(cfg.model)
        d = cfg.dino
        if d.out_dim <= 0:
            raise ValueError("dino.out_dim=0 (auto) must be resolved first: fovea.train.loop.resolve_auto(cfg, ...)")
        ib, mt = cfg.ibot, cfg.matryoshka
        self.widths = nesting_widths(backbone.embed_dim, mt.widths) if mt.enabled else [backbone.embed_dim]

        def make_head(k: int, hidden: int, bottleneck: int) -> nn.Module:
            if mt.enabled:
                return MatryoshkaHead(backbone.embed_dim, k, self.widths, hidden, bottleneck, d.nlayers,
                                      d.norm_last_layer, d.use_bn, mt.l2_norm, mt.input)
            return DINOHead(backbone.embed_dim, k, hidden, bottleneck, d.nlayers, d.norm_last_layer, d.use_bn)

        head = make_head(d.out_dim, d.hidden_dim, d.bottleneck_dim)
        patch_head = None
        if ib.enabled and ib.separate_head:
            patch_head = make_head(ib.out_dim or d.out_dim, ib.hidden_dim or d.hidden_dim,
                                   ib.bottleneck_dim or d.bottleneck_dim)
        # Without iBOT the inputs are never masked: the mask token takes no part (and must not, for DDP).
        backbone.mask_token.requires_grad_(ib.enabled)
        self.student = Student(backbone, head, patch_head, shared_head=ib.enabled and not ib.separate_head)
        # The teacher is a separate deep copy (never aliased), without stochastic depth, frozen, eval mode.
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher.backbone.blocks:
            blk.drop_path_rate = 0.0
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        k_patch = (ib.out_dim or d.out_dim) if ib.separate_head else d.out_dim
        # One loss (EMA centre) per level; a plain head keeps the single DINOLoss (same state_dict names).
        self.loss_fn = self._losses(head, d.out_dim, d.center_momentum)
        self.patch_loss_fn = self._losses(patch_head or head, k_patch, ib.center_momentum) if ib.enabled else None
        self.patch_centering = d.centering if ib.centering == "same" else ib.centering
        self.level_weights = list(mt.loss_weights) if mt.enabled and mt.loss_weights else [1.0] * len(self.widths)
        if len(self.level_weights) != len(self.widths):
            raise ValueError(f"matryoshka.loss_weights: {len(self.level_weights)} weights for {len(self.widths)} "
                             f"levels {self.widths}")

    def _losses(self, head: nn.Module, k: int, momentum: float) -> nn.Module:
        if isinstance(head, MatryoshkaHead):
            return nn.ModuleList(DINOLoss(km, self.cfg.dino.student_temp, momentum) for km in head.out_dims)
        return DINOLoss(k, self.cfg.dino.student_temp, momentum)

    @staticmethod
    def _level_losses(fn: nn.Module) -> list[DINOLoss]:
        return list(fn) if isinstance(fn, nn.ModuleList) else [fn]  # type: ignore[list-item]

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher.eval()  # the teacher always stays in eval mode (no drop-path) ...
        heads = [self.teacher.head] + ([self.teacher.patch_head] if self.teacher.patch_head is not None else [])
        for m in (m for h in heads for m in h.modules()):  # ... except the BatchNorm of both heads, which
            if isinstance(m, nn.BatchNorm1d):               # normalises with batch statistics as in official
                m.train(mode)                                # DINO (running stats are not EMA'd)
        return self

    def teacher_targets(self, logits: Tensor, loss_fn: DINOLoss, centering: str, temp: float,
                        n_total: Tensor | None = None) -> Tensor:
        """Teacher probabilities [N, K]: EMA-centred softmax, or Sinkhorn-Knopp over all ranks."""
        if centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.cfg.dino.sinkhorn_iters, n_total)
        return loss_fn.teacher_probs(logits, temp)

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, float]]:
        cfg, c = self.cfg, self.cfg.crops
        crops = [normalize(x, c.mean, c.std) for x in batch["crops"]]
        masks = batch.get("masks") if self.patch_loss_fn is not None else None
        with torch.no_grad():
            t_logits, _, *t_patch = self.teacher(crops[:2], None, masks)
        s_logits, s_cls, *s_patch = self.student_fwd(crops, masks, masks)
        multi = len(self.widths) > 1  # Matryoshka: one loss per nesting level, weighted sum (METHODS.md 4)
        logs: dict = {}
        loss_dino = s_cls.new_zeros((), dtype=torch.float32)
        for m, (fn, t_l, s_l) in enumerate(zip(self._level_losses(self.loss_fn), as_levels(t_logits),
                                               as_levels(s_logits))):
            p_t = self.teacher_targets(t_l, fn, cfg.dino.centering, sv.teacher_temp)
            l_m = cross_view_loss(s_l, p_t, 2, cfg.dino.student_temp)
            loss_dino = loss_dino + self.level_weights[m] * l_m
            if multi:
                logs[f"loss/dino@{self.widths[m]}"] = l_m.detach()
            if m == len(self.widths) - 1:  # collapse diagnostics of the full-width level
                logs.update(collapse_stats(p_t.detach()))
            if cfg.dino.centering == "ema":
                fn.update_center(t_l)  # after the loss: the centre is used from the next step
        logs["loss/dino"] = loss_dino.detach()
        loss = cfg.dino.loss_weight * loss_dino
        if self.patch_loss_fn is not None and masks is not None:
            s_patch, t_patch = s_patch[0], t_patch[0]
            n_masked = masks.sum().float()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(n_masked)
            weights = masked_patch_weights(masks)
            loss_ibot = loss.new_zeros(())
            for m, (fn, t_l, s_l) in enumerate(zip(self._level_losses(self.patch_loss_fn), as_levels(t_patch),
                                                   as_levels(s_patch))):
                p_patch = self.teacher_targets(t_l, fn, self.patch_centering, sv.teacher_temp, n_masked)
                l_m = ibot_patch_loss(s_l, p_patch, weights, masks.shape[0], cfg.dino.student_temp)
                loss_ibot = loss_ibot + self.level_weights[m] * l_m
                if multi:
                    logs[f"loss/ibot@{self.widths[m]}"] = l_m.detach()
                if self.patch_centering == "ema":
                    fn.update_center(t_l)
            loss = loss + cfg.ibot.loss_weight * loss_ibot
            logs["loss/ibot"] = loss_ibot.detach()
            logs["masked_fraction"] = masks.float().mean()
        if cfg.koleo.weight > 0:
            loss_koleo = sum(koleo_loss(x) for x in s_cls[:2 * crops[0].shape[0]].chunk(2))
            loss = loss + cfg.koleo.weight * loss_koleo
            logs["loss/koleo"] = loss_koleo.detach()  # type: ignore[union-attr]
        logs["loss/total"] = loss.detach()
        return loss, logs

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        s = [p.detach() for p in self.student.parameters()]
        t = list(self.teacher.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def eval_backbone(self) -> VisionTransformer:
        return self.teacher.backbone

    def last_layer_params(self) -> list[nn.Parameter]:
        heads = [self.student.head] + ([self.student.patch_head] if self.student.patch_head is not None else [])
        layers = [m for h in heads for m in (h.last_layer_modules if isinstance(h, MatryoshkaHead) else [h.last_layer])]
        return [p for layer in layers for p in layer.parameters()]


def build_method(cfg: RunConfig) -> Method:
    """Instantiate the method named by ``cfg.method`` (kept here for callers; see methods/registry.py)."""
    from fovea.methods.registry import build_method as build
    return build(cfg)
