"""Distillation (METHODS.md sections 3 and 5c): a frozen teacher backbone, any fovea can load, taught to a
smaller student; an EMA of the student is the result (evaluated and exported).

``distill.target=heads`` (the DINOv2 way, for teachers that come with their heads: a fovea run, an imported
folder with ``heads.safetensors``, a DINOv2 training checkpoint or a DINO v1 full checkpoint): the teacher's
frozen DINO head (and iBOT head) give the targets, centred as the ``dino`` section says (EMA centre or
Sinkhorn-Knopp, teacher temperature schedule); the student has heads of the same shape (prototypes included)
and is trained with the DINO term of the self-distillation family (teacher global crops vs every other student
crop, local crops included), the iBOT term on every patch of the two global crops (no masking), and KoLeo when
``koleo.weight`` > 0. No stochastic depth in the student (the presets set ``model.drop_path_rate: 0``).

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
from fovea.methods.dino import Head, Student, build_heads, head_parts, last_layer_params
from fovea.methods.terms import Outputs, StepInput, Term, sum_terms
from fovea.methods.terms.dino import DINOTerm
from fovea.methods.terms.ibot import IBOTTerm
from fovea.methods.terms.koleo import KoLeoTerm
from fovea.models.heads import DINOHead
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


class FrozenTeacher(nn.Module):
    """The frozen teacher: its backbone and, for ``distill.target=heads``, its DINO head and iBOT head (the DINO
    head itself when the teacher shared one). Eval mode, except the heads' BatchNorm layers, which normalise
    with batch statistics as the DINO teacher's do."""

    def __init__(self, backbone: VisionTransformer, head: Head | None = None, patch_head: Head | None = None) -> None:
        super().__init__()
        self.backbone, self.head, self.patch_head = backbone, head, patch_head
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(False)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.train(True)
        return self


def teacher_heads(cfg: RunConfig, teacher_dim: int, student_dim: int
                  ) -> tuple[Head, Head | None, Head, Head | None, bool, list[int]]:
    """The teacher's heads (loaded) and fresh student heads of the same shape: (teacher head, teacher patch
    head, student head, student patch head, shared, level widths). A fovea run's heads are built from its own
    config; heads without one (``heads.safetensors``, a released file) from their weights' shapes."""
    from fovea.config.build import build_section, legacy_tree
    from fovea.hub.backbone import load_head_states
    from fovea.hub.released import head_shape
    from fovea.data.sources import resolve_data_path
    path = resolve_data_path(cfg.distill.teacher)
    states, run_cfg = load_head_states(path)
    if "dino_head" not in states:
        raise ValueError(f"distill.target=heads: {path} has no DINO head (released hub backbones have none); "
                         "use distill.target=features, or a run folder / training checkpoint with its heads")
    if run_cfg is not None:
        rc = build_section(RunConfig, legacy_tree(RunConfig, run_cfg))
        t_head, t_patch, widths = build_heads(rc, teacher_dim)
        s_head, s_patch, s_widths = build_heads(rc, student_dim)
        shared = rc.ibot.enabled and not rc.ibot.separate_head
        if len(s_widths) != len(widths):
            raise ValueError(f"distill.target=heads: the teacher's Matryoshka levels {widths} have no counterpart "
                             f"at the student's width {student_dim} ({s_widths})")
        widths = s_widths
    else:
        shapes = {h: head_shape(sd) for h, sd in states.items()}
        d = cfg.dino

        def like(h: str, in_dim: int, student: bool) -> DINOHead:
            sh = shapes[h]
            return DINOHead(in_dim, sh["out_dim"], sh["hidden_dim"], sh["bottleneck_dim"], sh["nlayers"],
                            d.norm_last_layer if student else True, d.use_bn if student else False)
        t_head, s_head = like("dino_head", teacher_dim, False), like("dino_head", student_dim, True)
        t_patch = like("ibot_head", teacher_dim, False) if "ibot_head" in shapes else None
        s_patch = like("ibot_head", student_dim, True) if "ibot_head" in shapes else None
        shared, widths = False, [student_dim]
    t_head.load_state_dict(states["dino_head"])
    if t_patch is not None:
        if "ibot_head" not in states:
            raise ValueError(f"distill.target=heads: {path}: the run had a separate iBOT head, its weights are missing")
        t_patch.load_state_dict(states["ibot_head"])
    return t_head, (t_head if shared else t_patch), s_head, s_patch, shared, widths


class Distill(Method):
    """A batch is the multi-crop batch of the self-distillation family. ``features``: the two global crops are
    used; ``heads``: the teacher sees the two global crops, the student every crop."""

    student: DistillStudent | Student
    teacher: EMABackbone

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        from fovea.hub.backbone import load_backbone
        self.cfg = cfg
        d = cfg.distill
        if not d.teacher:
            raise ValueError("distill.teacher: the path of the frozen teacher is required")
        from fovea.data.sources import resolve_data_path
        frozen, meta = load_backbone(resolve_data_path(d.teacher))
        if frozen.cls_token is None:
            raise ValueError(f"distill.teacher={d.teacher}: the teacher has no CLS token")
        crops = meta.get("crops", {}) or {}
        self.teacher_mean = list(crops.get("mean") or IMAGENET_MEAN)
        self.teacher_std = list(crops.get("std") or IMAGENET_STD)
        backbone = VisionTransformer(cfg.model)
        backbone.mask_token.requires_grad_(False)  # no masking in distillation
        self.terms = nn.ModuleDict()
        if d.target == "features":
            self.__dict__["frozen"] = FrozenTeacher(frozen)  # moved by .to() (see _apply), never saved or trained
            self.student = DistillStudent(backbone, frozen.embed_dim)
        else:
            t_head, t_patch, s_head, s_patch, shared, widths = teacher_heads(cfg, frozen.embed_dim, backbone.embed_dim)
            self.__dict__["frozen"] = FrozenTeacher(frozen, t_head, t_patch)
            self.student = Student(backbone, s_head, s_patch, shared_head=shared)
            parts = head_parts(cfg, widths, s_head, s_patch, frozen)
            terms: list[Term] = [DINOTerm(parts)]
            if t_patch is not None:
                terms.append(IBOTTerm(parts))
            if KoLeoTerm.enabled(cfg):
                terms.append(KoLeoTerm(parts))
            self.terms.update({t.name: t for t in terms})
        self.teacher = EMABackbone(frozen_copy(backbone)).eval()  # the student's EMA: the result

    @property
    def frozen(self) -> FrozenTeacher:
        return self.__dict__["frozen"]

    def _apply(self, fn: Any, recurse: bool = True) -> "Distill":
        super()._apply(fn, recurse)
        self.__dict__["frozen"] = self.frozen._apply(fn)  # the frozen teacher follows the method's device
        return self

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_crops(self, raw: list[Tensor]) -> list[Tensor]:
        """The global crops as the teacher sees them: its own normalisation, at ``distill.teacher_size``."""
        size = self.cfg.distill.teacher_size
        tx = [normalize(t, self.teacher_mean, self.teacher_std) for t in raw]
        if size and size != tx[0].shape[-1]:
            tx = [F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False) for t in tx]
        return tx

    def teacher_tokens(self, tx: list[Tensor], grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The frozen teacher's CLS [2B, Dt] and patch tokens [2B, Np, Dt], its patch grid resized (bicubic)
        to the student's ``grid``."""
        outs = self.frozen.backbone.forward_features_list(tx)
        cls = torch.cat([o.cls for o in outs if o.cls is not None])
        patches = torch.cat([o.patches for o in outs])
        p = self.frozen.backbone.patch_size
        return cls, resize_patch_grid(patches, tx[0].shape[-2] // p, tx[0].shape[-1] // p, *grid)

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        c, d = self.cfg.crops, self.cfg.distill
        crops = batch["crops"] if d.target == "heads" else batch["crops"][:2]
        x = [normalize(t, c.mean, c.std) for t in crops]
        p_s = self.cfg.model.patch_size
        grid = (x[0].shape[-2] // p_s, x[0].shape[-1] // p_s)
        with torch.no_grad():
            t_cls, t_patch = self.teacher_tokens(self.teacher_crops(batch["crops"][:2]), grid)
        if d.target == "heads":
            return self.heads_step(x, t_cls, t_patch, sv)
        s_cls, s_patch = self.student_fwd(x)
        loss_cls = token_loss(s_cls, t_cls, d.loss)
        loss_patch = token_loss(s_patch, t_patch, d.loss)
        loss = loss_cls + d.patch_weight * loss_patch
        return loss, {"loss/distill_cls": loss_cls.detach(), "loss/distill_patch": loss_patch.detach(),
                      "loss/total": loss.detach()}

    def heads_step(self, x: list[Tensor], t_cls: Tensor, t_patch: Tensor, sv: StepValues
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """The DINO (+ iBOT, KoLeo) terms against the frozen teacher's heads; iBOT on every patch."""
        every = torch.ones(t_patch.shape[:2], dtype=torch.bool, device=t_patch.device)  # [2B, Np]
        with_patches = "ibot" in self.terms
        with torch.no_grad():
            fz = self.frozen
            assert fz.head is not None
            t_patch_logits = fz.patch_head(t_patch[every]) if with_patches and fz.patch_head is not None else None
            t = Outputs(fz.head(t_cls), t_cls, t_patch_logits, t_patch)
        s = Outputs(*self.student_fwd(x, None, every if with_patches else None))
        return sum_terms(self.terms, s, t, StepInput(x, every if with_patches else None, None), sv)

    def after_backward(self, sv: StepValues) -> None:
        if sv.sched.get("freeze_last_layer") and isinstance(self.student, Student):
            for p in last_layer_params(self.student):
                p.grad = None

    @torch.no_grad()
    def after_step(self, sv: StepValues) -> None:
        ema_update(self.teacher.backbone, self.student.backbone, sv.sched["momentum"])
        for term in self.terms.values():
            assert isinstance(term, Term)
            term.after_step(self.frozen.backbone, sv)

    def eval_backbone(self) -> VisionTransformer:
        return self.teacher.backbone


# ------------------------------------------------------------------------------------------------ the spec

def schedule(cfg: RunConfig, plan: Plan) -> Schedule:
    """momentum of the student's EMA (``optim.momentum_teacher`` -> ``optim.momentum_teacher_end``); with
    ``distill.target=heads`` also the self-distillation family's teacher temperature and freeze_last_layer."""
    if cfg.distill.target == "heads":
        from fovea.methods.dino_spec import schedule as family
        return family(cfg, plan)
    return lambda step: {"momentum": ema_schedule_value(cfg, plan, step)}


def train_data(cfg: RunConfig, source: Any, phase: str = "") -> Any:
    """The self-distillation family's multi-crop pipeline (the global crops are used)."""
    from fovea.methods.dino_spec import train_data as multicrop
    return multicrop(cfg, source, phase)


def _batch_augment(cfg: RunConfig) -> Any:
    """The self-distillation family's batched augmentation (its multi-crop pipeline is used)."""
    from fovea.methods.dino_spec import batch_augment
    return batch_augment(cfg)


def resolve(cfg: RunConfig, n_images: int, world: int) -> RunConfig:
    """The teacher must exist before any work (named); then the EMA momentum's 'auto' value."""
    import os

    from fovea.data.sources import resolve_data_path
    if cfg.distill.teacher and not os.path.exists(resolve_data_path(cfg.distill.teacher)):
        raise ValueError(f"distill.teacher: {cfg.distill.teacher} does not exist (a run folder, an imported folder, "
                         "backbone.safetensors, a checkpoint or a released file; for the presets, train the teacher "
                         "first, e.g. `fovea train dino_vittiny_cifar10`)")
    return resolve_momentum(cfg, n_images, world)


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
    """Two global crops (``features``), or every crop of the multi-crop batch (``heads``); with
    ``crops.augment=batched`` the family's canvas batch (the stepper crops it, as in training)."""
    if cfg.distill.target == "heads" or cfg.crops.augment == "batched":
        from fovea.methods.dino_spec import synthetic_batch as family
        return family(cfg, device)
    g = torch.Generator().manual_seed(cfg.train.seed)
    b, s = cfg.data.batch_size, cfg.crops.global_size
    return {"crops": [torch.randint(0, 256, (b, cfg.model.in_chans, s, s), generator=g, dtype=torch.uint8).to(device)
                      for _ in range(2)], "skipped": 0}


def flops(cfg: RunConfig, batch: dict) -> dict[str, Any]:
    """Student forward (1x) + backward (2x, less its patch embedding): on the 2 global crops and the projections
    (``features``), or on every crop with the ``dino`` section's head (``heads``). The frozen teacher's forward
    is not counted (its architecture is only known once it is loaded)."""
    if cfg.distill.target == "heads":
        from fovea.methods.dino_spec import flops as family
        f = family(cfg, batch)
        return {"student_forward": f["student_forward"], "student_backward": f["student_backward"],
                "total": f["student_forward"] + f["student_backward"],
                "tokens_per_image": {"student": f["tokens_per_image"]["student"], "teacher": 0},
                "embed_dim": dims(cfg.model)[0]}
    n, size = 2 * cfg.data.batch_size, cfg.crops.global_size
    embed, blocks = backbone_flops(cfg.model, size)
    fwd = n * (embed + blocks)
    return {"student_forward": fwd, "student_backward": 2 * fwd - n * embed, "total": 3 * fwd - n * embed,
            "tokens_per_image": {"student": 2 * ((size // cfg.model.patch_size) ** 2 + 1), "teacher": 0},
            "embed_dim": dims(cfg.model)[0]}


SPEC = register(MethodSpec(
    names=("distill",), sections=("distill", "dino", "koleo", "crops"), build=Distill, train_data=train_data, schedule=schedule,
    resolve=resolve, check=check, synthetic_batch=synthetic_batch, flops=flops, batch_augment=_batch_augment))
