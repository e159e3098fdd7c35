"""Distillation (METHODS.md sections 3 and 5c): a frozen teacher backbone, any fovea can load, taught to a
smaller student; an EMA of the student is the result (evaluated and exported).

``distill.target=features``: the student's CLS token and patch tokens, each through a learned linear projection
to the teacher's width, regress the teacher's (L2-normalised) CLS and patch tokens of the same global crops,
by cosine distance or smooth-L1. The teacher may see the crops at another size (``distill.teacher_size``); its
patch grid is then resized bicubically to the student's. The teacher uses its own normalisation.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.core.plan import Plan
from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fovea.losses.gram import resize_patch_grid
from fovea.methods.base import (EMABackbone, Method, StepValues, ema_schedule_value, ema_update, frozen_copy,
                               resolve_momentum)
from fovea.methods.spec import MethodSpec, Schedule, register
from fovea.models.flops import backbone_flops, dims
from fovea.models.vit import VisionTransformer


def token_loss(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Mean over tokens [..., D] of 1 - cos(student, teacher) (``cosine``) or of smooth-L1 (beta 1) between the
    L2-normalised tokens, summed over channels (``smooth_l1``), in float32."""
    s, t = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    if kind == "cosine":
        return (1 - (s * t).sum(-1)).mean()
    return F.smooth_l1_loss(s, t, reduction="none", beta=1.0).sum(-1).mean()


class DistillStudent(nn.Module):
    """The student backbone and its projections to the teacher's width (CLS and patch tokens)."""

    backbone: VisionTransformer

    def __init__(self, backbone: VisionTransformer, teacher_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.cls_proj = nn.Linear(backbone.embed_dim, teacher_dim)
        self.patch_proj = nn.Linear(backbone.embed_dim, teacher_dim)

    def forward(self, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Global crops -> (projected CLS [n*B, Dt], projected patch tokens [n*B, Np, Dt])."""
        outs = self.backbone.forward_features_list(crops)
        cls = torch.cat([o.cls for o in outs if o.cls is not None])
        patches = torch.cat([o.patches for o in outs])
        return self.cls_proj(cls), self.patch_proj(patches)


class Distill(Method):
    """A batch is the multi-crop batch of the self-distillation family; only the two global crops are used."""

    student: DistillStudent
    teacher: EMABackbone

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        from fovea.hub.backbone import load_backbone
        self.cfg = cfg
        if not cfg.distill.teacher:
            raise ValueError("distill.teacher: the path of the frozen teacher is required")
        frozen, meta = load_backbone(cfg.distill.teacher)
        if frozen.cls_token is None:
            raise ValueError(f"distill.teacher={cfg.distill.teacher}: the teacher has no CLS token")
        for p in frozen.parameters():
            p.requires_grad_(False)
        self.__dict__["frozen"] = frozen.eval()  # moved with the method by .to() below, never saved or trained
        crops = meta.get("crops", {}) or {}
        self.teacher_mean = list(crops.get("mean") or IMAGENET_MEAN)
        self.teacher_std = list(crops.get("std") or IMAGENET_STD)
        backbone = VisionTransformer(cfg.model)
        backbone.mask_token.requires_grad_(False)  # no masking in distillation
        self.student = DistillStudent(backbone, frozen.embed_dim)
        self.teacher = EMABackbone(frozen_copy(backbone)).eval()  # the student's EMA: the result

    @property
    def frozen(self) -> VisionTransformer:
        return self.__dict__["frozen"]

    def _apply(self, fn: Any, recurse: bool = True) -> "Distill":
        super()._apply(fn, recurse)
        self.__dict__["frozen"] = self.frozen._apply(fn)  # the frozen teacher follows the method's device
        return self

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        c, d = self.cfg.crops, self.cfg.distill
        raw = batch["crops"][:2]
        x = [normalize(t, c.mean, c.std) for t in raw]
        with torch.no_grad():
            tx = [normalize(t, self.teacher_mean, self.teacher_std) for t in raw]
            if d.teacher_size and d.teacher_size != tx[0].shape[-1]:
                tx = [F.interpolate(t, size=(d.teacher_size, d.teacher_size), mode="bicubic", align_corners=False)
                      for t in tx]
            outs = self.frozen.forward_features_list(tx)
            t_cls = torch.cat([o.cls for o in outs if o.cls is not None])
            t_patch = torch.cat([o.patches for o in outs])
        s_cls, s_patch = self.student_fwd(x)
        p_s, p_t = self.student.backbone.patch_size, self.frozen.patch_size
        t_patch = resize_patch_grid(t_patch, tx[0].shape[-2] // p_t, tx[0].shape[-1] // p_t,
                                    x[0].shape[-2] // p_s, x[0].shape[-1] // p_s)
        loss_cls = token_loss(s_cls, t_cls, d.loss)
        loss_patch = token_loss(s_patch, t_patch, d.loss)
        loss = loss_cls + d.patch_weight * loss_patch
        return loss, {"loss/distill_cls": loss_cls.detach(), "loss/distill_patch": loss_patch.detach(),
                      "loss/total": loss.detach()}

    @torch.no_grad()
    def after_step(self, sv: StepValues) -> None:
        ema_update(self.teacher.backbone, self.student.backbone, sv.sched["momentum"])

    def eval_backbone(self) -> VisionTransformer:
        return self.teacher.backbone


# ------------------------------------------------------------------------------------------------ the spec

def schedule(cfg: RunConfig, plan: Plan) -> Schedule:
    """momentum of the student's EMA (``optim.momentum_teacher`` -> ``optim.momentum_teacher_end``)."""
    return lambda step: {"momentum": ema_schedule_value(cfg, plan, step)}


def train_data(cfg: RunConfig, source: Any, phase: str = "") -> Any:
    """The self-distillation family's multi-crop pipeline (the global crops are used)."""
    from fovea.methods.dino_spec import train_data as multicrop
    return multicrop(cfg, source, phase)


def check(cfg: RunConfig) -> list[str]:
    bad = []
    if not cfg.distill.teacher:
        bad.append("distill.teacher: the path of the frozen teacher is required (method: distill)")
    if not cfg.model.cls_token:
        bad.append("model.cls_token=false: distillation matches the CLS token")
    if cfg.ibot.enabled:
        bad.append("ibot.enabled=true: distillation does not mask the student (set ibot.enabled=false)")
    return bad


def synthetic_batch(cfg: RunConfig, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(cfg.train.seed)
    b, s = cfg.data.batch_size, cfg.crops.global_size
    return {"crops": [torch.randint(0, 256, (b, cfg.model.in_chans, s, s), generator=g, dtype=torch.uint8).to(device)
                      for _ in range(2)], "skipped": 0}


def flops(cfg: RunConfig, batch: dict) -> dict[str, Any]:
    """Student forward (1x) + backward (2x, less its patch embedding) on the 2 global crops, and the projections;
    the frozen teacher's forward is not counted (its architecture is only known once it is loaded)."""
    n, size = 2 * cfg.data.batch_size, cfg.crops.global_size
    embed, blocks = backbone_flops(cfg.model, size)
    fwd = n * (embed + blocks)
    return {"student_forward": fwd, "student_backward": 2 * fwd - n * embed, "total": 3 * fwd - n * embed,
            "tokens_per_image": {"student": 2 * ((size // cfg.model.patch_size) ** 2 + 1), "teacher": 0},
            "embed_dim": dims(cfg.model)[0]}


SPEC = register(MethodSpec(
    names=("distill",), sections=("distill", "crops"), build=Distill, train_data=train_data, schedule=schedule,
    resolve=resolve_momentum, check=check, synthetic_batch=synthetic_batch, flops=flops))
