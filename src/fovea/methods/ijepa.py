"""I-JEPA: predict the target encoder's features of masked blocks from a context block (METHODS.md 5).

One view per image, no hand-made augmentation. The context encoder (``student.backbone``)
sees only the context patches; the predictor (``student.predictor``) predicts, for each
target block, the layer-normalised output of the target encoder (``teacher.backbone``, an
EMA copy of the context encoder that sees the whole image and never receives gradients).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.data.augment import normalize
from fovea.losses.jepa import jepa_loss, jepa_targets
from fovea.methods.base import Method, StepValues
from fovea.models.predictor import Predictor
from fovea.models.vit import VisionTransformer


class ContextPredictor(nn.Module):
    """Context encoder + predictor: ``forward(x, ctx_idx, ctx_valid, tgt_idx, tgt_valid)`` -> [B*M, Nt, D]."""

    def __init__(self, backbone: VisionTransformer, predictor: Predictor) -> None:
        super().__init__()
        self.backbone = backbone
        self.predictor = predictor

    def forward(self, x: Tensor, ctx_idx: Tensor, ctx_valid: Tensor, tgt_idx: Tensor, tgt_valid: Tensor) -> Tensor:
        z = self.backbone.forward_features(x, keep=ctx_idx, keep_valid=ctx_valid)["x_norm_patchtokens"]
        return self.predictor(z, ctx_idx, ctx_valid, tgt_idx, tgt_valid)


class TargetEncoder(nn.Module):
    """Holds the EMA backbone under the name ``backbone`` (checkpoint keys ``teacher.backbone.*``)."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone


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
        target = copy.deepcopy(backbone)  # separate object, never aliased
        for blk in target.blocks:
            blk.drop_path_rate = 0.0
        for p in target.parameters():
            p.requires_grad_(False)
        self.teacher = TargetEncoder(target).eval()

    def train(self, mode: bool = True) -> "IJEPA":
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg.crops
        x = normalize(batch["images"], c.mean, c.std)
        tgt_idx, tgt_valid = batch["tgt_idx"], batch["tgt_valid"]
        with torch.no_grad():
            h = self.teacher.backbone.forward_features(x)["x_norm_patchtokens"]  # [B, Np, D]
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
    def update_teacher(self, momentum: float) -> None:
        s = [p.detach() for p in self.student.backbone.parameters()]
        t = list(self.teacher.backbone.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1.0 - momentum)

    def eval_backbone(self) -> VisionTransformer:
        return self.teacher.backbone
