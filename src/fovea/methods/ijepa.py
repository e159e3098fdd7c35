"""I-JEPA: predict the target encoder's features of masked blocks from a context block (METHODS.md 5).

One view per image, no hand-made augmentation. The context encoder (``student.backbone``)
sees only the context patches; the predictor (``student.predictor``) predicts, for each
target block, the layer-normalised output of the target encoder (``teacher.backbone``, an
EMA copy of the context encoder that sees the whole image and never receives gradients).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from fovea.config.schema import RunConfig
from fovea.core.batch import to_device
from fovea.core.plan import Plan
from fovea.core.schedules import pair
from fovea.data.augment import normalize
from fovea.data.base import ImageSource
from fovea.losses.jepa import jepa_loss, jepa_targets
from fovea.methods.base import (EMABackbone, Method, StepValues, ema_schedule_value, ema_update, frozen_copy,
                               resolve_momentum)
from fovea.methods.spec import MethodSpec, Schedule, register
from fovea.models.flops import backbone_flops, block_flops, dims
from fovea.models.predictor import Predictor
from fovea.models.vit import VisionTransformer


class ContextPredictor(nn.Module):
    """Context encoder + predictor: ``forward(x, ctx_idx, ctx_valid, tgt_idx, tgt_valid)`` -> [B*M, Nt, D]."""

    backbone: VisionTransformer
    predictor: Predictor

    def __init__(self, backbone: VisionTransformer, predictor: Predictor) -> None:
        super().__init__()
        self.backbone = backbone
        self.predictor = predictor

    def forward(self, x: Tensor, ctx_idx: Tensor, ctx_valid: Tensor, tgt_idx: Tensor, tgt_valid: Tensor) -> Tensor:
        z = self.backbone.forward_features(x, keep=ctx_idx, keep_valid=ctx_valid).patches
        return self.predictor(z, ctx_idx, ctx_valid, tgt_idx, tgt_valid)


def gather_targets(h: Tensor, tgt_idx: Tensor) -> Tensor:
    """Patch features h [B, Np, D] at target indices [B, M, Nt] -> [B*M, Nt, D]."""
    b, m, nt = tgt_idx.shape
    idx = tgt_idx.reshape(b, m * nt, 1).expand(-1, -1, h.shape[-1])
    return h.gather(1, idx).reshape(b * m, nt, h.shape[-1])


def feature_std(x: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std across rows of L2-normalised x [N, D].

    About 1/sqrt(D) for spread-out features; 0 when every row is the same vector (collapse).
    """
    return F.normalize(x.float(), dim=-1).std(0).mean()


class IJEPA(Method):
    """I-JEPA method. A batch is the output of :class:`fovea.data.single_view.MaskCollate`."""

    student: ContextPredictor
    teacher: EMABackbone

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        j = cfg.ijepa
        backbone = VisionTransformer(cfg.model)
        backbone.mask_token.requires_grad_(False)  # I-JEPA drops masked patches; the token takes no part
        grid = cfg.crops.global_size // cfg.model.patch_size
        predictor = Predictor(backbone.embed_dim, grid, grid, j.pred_dim, j.pred_depth,
                              j.pred_heads or backbone.num_heads, norm_eps=cfg.model.norm_eps,
                              sincos_layout=cfg.model.sincos_layout)
        self.student = ContextPredictor(backbone, predictor)
        self.teacher = EMABackbone(frozen_copy(backbone)).eval()  # the target encoder

    def train(self, mode: bool = True) -> "IJEPA":
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg.crops
        x = normalize(batch["images"], c.mean, c.std)
        tgt_idx, tgt_valid = batch["tgt_idx"], batch["tgt_valid"]
        with torch.no_grad():
            h = self.teacher.backbone.forward_features(x).patches  # [B, Np, D]
            targets = gather_targets(jepa_targets(h), tgt_idx)
        pred = self.student_fwd(x, batch["ctx_idx"], batch["ctx_valid"], tgt_idx, tgt_valid)
        valid = tgt_valid.reshape(pred.shape[0], -1)
        count = valid.sum().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)  # global number of target patches, shared out over the ranks
            count = count / torch.distributed.get_world_size()
        loss = jepa_loss(pred, targets.to(pred.dtype), valid, self.cfg.ijepa.loss, count=count)
        with torch.no_grad():
            logs = {"loss/jepa": loss.detach(),
                    "diag/target_std": feature_std(h.mean(1)),  # image-level (mean patch) spread
                    "diag/pred_std": feature_std(pred[valid])}  # patch-level spread of predictions
        return loss, logs

    @torch.no_grad()
    def after_step(self, sv: StepValues) -> None:
        # EMA of the context encoder (during a head warm-up both are the same frozen backbone: nothing to do)
        if not sv.heads_only:
            ema_update(self.teacher.backbone, self.student.backbone, sv.sched["momentum"])

    def eval_backbone(self) -> VisionTransformer:
        return self.teacher.backbone


# ------------------------------------------------------------------------------------------------ the spec

def mask_collate(cfg: RunConfig) -> Callable[[list], dict]:
    """I-JEPA collate: stacks the views and draws each image's multi-block masks from its own seed."""
    from fovea.data.single_view import MaskCollate
    from fovea.masking.multiblock import MultiBlockSampler
    j = cfg.ijepa
    grid = cfg.crops.global_size // cfg.model.patch_size
    sampler = MultiBlockSampler(grid, grid, j.num_targets, pair(j.target_scale), pair(j.target_aspect),
                                pair(j.context_scale), pair(j.context_aspect), j.min_context)
    return MaskCollate(sampler, j.equalize)


def train_data(cfg: RunConfig, source: ImageSource, phase: str = "") -> tuple[Dataset, Callable[[list], dict]]:
    """One view per image (RandomResizedCrop, optional flip) + multi-block masks drawn in the collate."""
    from fovea.data.single_view import SingleView, SingleViewDataset
    c, j = cfg.crops, cfg.ijepa
    view = SingleView(c.global_size, j.crop_scale, c.ratio, j.flip_p, c.interpolation)
    return SingleViewDataset(source, view, cfg.train.seed), mask_collate(cfg)


def schedule(cfg: RunConfig, plan: Plan) -> Schedule:
    """momentum: linear (I-JEPA) or cosine from ``optim.momentum_teacher`` to ``optim.momentum_teacher_end``."""
    return lambda step: {"momentum": ema_schedule_value(cfg, plan, step)}


def check(cfg: RunConfig) -> list[str]:
    j, bad = cfg.ijepa, []
    for key in ("target_scale", "target_aspect", "context_scale", "context_aspect", "crop_scale"):
        v = getattr(j, key)
        if not (len(v) == 2 and 0 < v[0] <= v[1]):
            bad.append(f"ijepa.{key} must be [low, high] with 0 < low <= high, got {v}")
    if j.num_targets < 1 or j.min_context < 1:
        bad.append("ijepa.num_targets and ijepa.min_context must be >= 1")
    if j.pred_dim <= 0 or j.pred_depth <= 0 or (j.pred_heads is not None and j.pred_heads < 1):
        bad.append("ijepa.pred_dim/pred_depth must be > 0")
    if cfg.crops.augment != "per_image":
        bad.append(f"crops.augment={cfg.crops.augment}: I-JEPA's single view is augmented per image (per_image)")
    return bad


def synthetic_batch(cfg: RunConfig, device: torch.device) -> dict:
    """Random uint8 images [B, C, S, S] with multi-block masks drawn by the training collate."""
    g = torch.Generator().manual_seed(cfg.train.seed)
    b, s = cfg.data.batch_size, cfg.crops.global_size
    imgs = torch.randint(0, 256, (b, cfg.model.in_chans, s, s), generator=g, dtype=torch.uint8)
    batch = mask_collate(cfg)([(imgs[i], cfg.train.seed * 1_000_003 + i, 0) for i in range(b)])
    return {k: to_device(v, device) for k, v in batch.items()}


def flops(cfg: RunConfig, batch: dict) -> dict[str, Any]:
    """FLOPs of one I-JEPA step from the config and the batch's (padded) index shapes; matmuls only.

    Np = (S/p)^2 patches, Nc / Nt = padded context / target-block lengths, M target blocks, predictor
    width Dp, depth Lp, MLP 4 Dp. Padding is computed like real tokens, so it is counted.
      target encoder = B x [patch embed + L blocks on Np tokens]                         (forward only)
      context encoder = B x [patch embed + L blocks on Nc tokens]
      predictor = B*M x [Nc x (D -> Dp) + Lp blocks on Nc + Nt tokens + Nt x (Dp -> D)]
    Student = context encoder + predictor, forward (1x) and backward (2x, except the patch embedding).
    """
    m, j, size = cfg.model, cfg.ijepa, cfg.crops.global_size
    b, mm, nt = (int(x) for x in batch["tgt_idx"].shape)
    nc = int(batch["ctx_idx"].shape[1])
    patch, blocks = backbone_flops(m, size)
    target = b * (patch + blocks)
    context = b * (patch + backbone_flops(m, size, tokens=nc)[1])
    d, dp = dims(m)[0], j.pred_dim
    predictor = b * mm * (2 * nc * d * dp + j.pred_depth * block_flops(nc + nt, dp, 4 * dp) + 2 * nt * dp * d)
    student_fwd = context + predictor
    student_bwd = 2 * student_fwd - b * patch
    prefix = int(m.cls_token) + m.num_register_tokens
    return {"per_image": {"patches": (size // m.patch_size) ** 2, "context_tokens_padded": nc, "target_blocks": mm,
                          "target_tokens_padded": nt},
            "teacher_forward": target, "context_forward": context, "predictor_forward": predictor,
            "student_forward": student_fwd, "student_backward": student_bwd,
            "total": target + student_fwd + student_bwd,
            "tokens_per_image": {"teacher": prefix + (size // m.patch_size) ** 2, "student": prefix + nc,
                                 "predictor": mm * (nc + nt)}}


SPEC = register(MethodSpec(
    names=("ijepa",), sections=("ijepa", "crops"), build=IJEPA, train_data=train_data, schedule=schedule,
    resolve=resolve_momentum, check=check, synthetic_batch=synthetic_batch, flops=flops))
