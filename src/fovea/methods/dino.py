"""DINO: self-distillation with an EMA teacher, centering and sharpening, multi-crop (METHODS.md 0-1)."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.data.augment import normalize
from fovea.losses.dino import DINOLoss
from fovea.methods.base import Method, StepValues
from fovea.models.heads import DINOHead
from fovea.models.vit import VisionTransformer


class Student(nn.Module):
    """Backbone + DINO head. ``forward(crops)`` -> (logits [n_crops*B, K], CLS [n_crops*B, D])."""

    def __init__(self, backbone: VisionTransformer, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[Tensor]) -> tuple[Tensor, Tensor]:
        outs = self.backbone.forward_features_list(crops)
        cls = torch.cat([o["x_norm_clstoken"] for o in outs])  # type: ignore[misc]
        return self.head(cls), cls


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
    """DINO method. A batch is ``{"crops": [global1, global2, local...]}`` of uint8 [B,3,S,S]."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = VisionTransformer(cfg.model)
        d = cfg.dino
        if d.out_dim <= 0:
            raise ValueError("dino.out_dim=0 (auto) must be resolved first: fovea.train.loop.resolve_auto(cfg, ...)")
        head = DINOHead(backbone.embed_dim, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.nlayers, d.norm_last_layer,
                        d.use_bn)
        # Plain DINO never masks its inputs: the mask token takes no part (and must not, for DDP).
        backbone.mask_token.requires_grad_(False)
        self.student = Student(backbone, head)
        # The teacher is a separate deep copy (never aliased), without stochastic depth, frozen, eval mode.
        self.teacher = copy.deepcopy(self.student)
        for blk in self.teacher.backbone.blocks:
            blk.drop_path_rate = 0.0
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        self.loss_fn = DINOLoss(d.out_dim, d.student_temp, d.center_momentum)

    def train(self, mode: bool = True) -> "DINO":
        super().train(mode)
        self.teacher.eval()  # the teacher always stays in eval mode (no drop-path) ...
        for m in self.teacher.head.modules():  # ... except head BatchNorm, which normalises with batch
            if isinstance(m, nn.BatchNorm1d):   # statistics as in official DINO (running stats are not EMA'd)
                m.train(mode)
        return self

    def training_step(self, batch: dict, sv: StepValues) -> tuple[Tensor, dict[str, float]]:
        c = self.cfg.crops
        crops = [normalize(x, c.mean, c.std) for x in batch["crops"]]
        with torch.no_grad():
            t_logits, _ = self.teacher(crops[:2])
        s_logits, _ = self.student_fwd(crops)
        loss = self.loss_fn(s_logits, t_logits, sv.teacher_temp, n_global=2)
        with torch.no_grad():
            logs = {"loss/dino": loss.detach(), **collapse_stats(self.loss_fn.teacher_probs(t_logits, sv.teacher_temp))}
        self.loss_fn.update_center(t_logits)
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
        return list(self.student.head.last_layer.parameters())


def build_method(cfg: RunConfig) -> Method:
    """Instantiate the method named by ``cfg.method`` (kept here for callers; see methods/registry.py)."""
    from fovea.methods.registry import build_method as build
    return build(cfg)
