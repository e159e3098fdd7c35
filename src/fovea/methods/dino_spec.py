"""What the rest of fovea knows about the self-distillation family (``method: dino | dinov2 | franca | dinov3``):
its data pipeline, schedules, 'auto' values, cross-field checks and the benchmark's batch and FLOPs.
Registered at the bottom; :mod:`fovea.methods.registry` imports this module."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from fovea.config.schema import RunConfig
from fovea.core.plan import Plan
from fovea.core.schedules import linear_warmup_constant, pair
from fovea.data.augment import CropsConfig
from fovea.data.base import ImageSource
from fovea.methods.base import ema_schedule_value, resolve_momentum
from fovea.methods.dino import DINO
from fovea.methods.spec import MethodSpec, Schedule, register
from fovea.methods.terms.gram import gram_weight
from fovea.models.flops import backbone_flops, head_flops


def auto_prototypes(n_images: int) -> int:
    """K for ``dino.out_dim=null`` (auto): a power of two near N/16, within [1024, 65536].

    Small sets get small K (the ln K plateau of DINO on small data, METHODS.md section 1):
    60k images -> 4096, 1.28M (ImageNet) -> 65536.
    """
    k = 2 ** round(math.log2(max(n_images, 1) / 16))
    return int(min(65536, max(1024, k)))


def resolve(cfg: RunConfig, n_images: int, world: int) -> RunConfig:
    """``dino.out_dim=null`` -> :func:`auto_prototypes`; ``optim.momentum_teacher=null`` -> from the run length."""
    cfg = resolve_momentum(cfg, n_images, world)
    if cfg.dino.out_dim is None:
        cfg = copy.deepcopy(cfg)
        cfg.dino.out_dim = auto_prototypes(n_images)
    return cfg


def in_highres(cfg: RunConfig, plan: Plan, step: int) -> bool:
    """True when ``step`` is in the last ``highres.steps`` steps (the high-resolution phase)."""
    return cfg.highres.steps > 0 and step >= plan.total_steps - cfg.highres.steps


def phase(cfg: RunConfig, plan: Plan, step: int) -> str:
    return "highres" if in_highres(cfg, plan, step) else ""


def schedule(cfg: RunConfig, plan: Plan) -> Schedule:
    """momentum (cosine to ``optim.momentum_teacher_end``), teacher_temp (linear warm-up, then constant),
    freeze_last_layer (1 during the first ``optim.freeze_last_layer_epochs``), gram_weight (with Gram)."""
    d = cfg.dino
    temp_warmup, freeze = plan.steps(d.warmup_teacher_temp_epochs), plan.steps(cfg.optim.freeze_last_layer_epochs)

    def at(step: int) -> dict[str, float]:
        out = {"momentum": ema_schedule_value(cfg, plan, step),
               "teacher_temp": linear_warmup_constant(step, temp_warmup, d.warmup_teacher_temp, d.teacher_temp),
               "freeze_last_layer": float(step < freeze)}
        if cfg.gram.enabled:
            out["gram_weight"] = gram_weight(cfg, step, in_highres(cfg, plan, step))
        return out
    return at


def phase_crops(cfg: RunConfig, phase: str = "") -> tuple[CropsConfig, int]:
    """The crops section of a data phase (``highres``: the high-resolution phase's crop sizes) and the size of
    the Gram teacher's own global crops (0: none)."""
    crops = copy.deepcopy(cfg.crops)
    if phase == "highres":
        crops.global_size = cfg.highres.global_size or crops.global_size
        crops.local_size = cfg.highres.local_size or crops.local_size
    return crops, gram_size(cfg, crops.global_size)


def train_data(cfg: RunConfig, source: ImageSource, phase: str = "") -> tuple[Dataset, Callable[[list], dict]]:
    """Multi-crop views (+ iBOT block masks of the global crops; + the Gram teacher's larger global crops),
    batch ``{"crops": [...], "masks"?}``; phase ``highres`` uses the high-resolution phase's crop sizes.

    ``crops.augment=batched``: the images only decoded, on a square canvas (``crops.canvas``; 0 = the longest
    side of a few probed images, at most 2 x the global crop size or the Gram crop size when larger), batch
    ``{"images", "sizes", "keys", "phase", "masks"?}``; the stepper crops it on the device (:func:`batch_augment`)."""
    from fovea.data.augment import MultiCrop
    from fovea.data.loader import (
        CanvasCollate,
        CanvasDataset,
        MultiCropDataset,
        collate_multicrop,
    )
    from fovea.masking.block import BlockMasker
    crops, extra = phase_crops(cfg, phase)
    masker = None
    if cfg.ibot.enabled:
        ib = cfg.ibot
        masker = BlockMasker(crops.global_size // cfg.model.patch_size, ib.mask_prob, pair(ib.mask_ratio),
                             ib.mask_min_block, ib.mask_type, ib.mask_roll)
    if crops.augment == "batched":
        return CanvasDataset(source, batched_canvas(cfg, source, phase), cfg.train.seed, masker), CanvasCollate(phase)
    return MultiCropDataset(source, MultiCrop(crops, extra_global_size=extra), cfg.train.seed, masker), collate_multicrop


def batched_canvas(cfg: RunConfig, source: ImageSource, phase: str = "") -> int:
    """Canvas side of ``crops.augment=batched``: ``crops.canvas``, or 0 = auto: the longest side of 16 images
    probed at evenly spread indices (:func:`~fovea.data.loader.auto_canvas`), at most 2 x the phase's global
    crop size (or the Gram teacher's crop size when larger)."""
    from fovea.data.loader import auto_canvas
    crops, extra = phase_crops(cfg, phase)
    return crops.canvas or auto_canvas(source, max(2 * crops.global_size, extra))


def batch_augment(cfg: RunConfig) -> Callable[[dict], dict]:
    """The stepper's batched augmentation (``crops.augment=batched``): canvas batch -> the crops of its phase."""
    from fovea.data.batch_augment import PhaseAugment
    return PhaseAugment(lambda phase: phase_crops(cfg, phase), cfg.train.seed)


def gram_size(cfg: RunConfig, global_size: int) -> int:
    """Size of the Gram teacher's own global crops (0: it sees the student's): ``gram.teacher_size`` scaled
    like the global crops in the high-resolution phase."""
    size = cfg.gram.teacher_size
    if not cfg.gram.enabled or not size:
        return 0
    return int(round(size * global_size / cfg.crops.global_size))


def check(cfg: RunConfig) -> list[str]:
    """Cross-field problems of the self-distillation parts (one message each)."""
    bad = []
    if not cfg.model.cls_token:
        bad.append("model.cls_token=false: the DINO family needs the CLS token (I-JEPA does not)")
    d, ib, mt, g = cfg.dino, cfg.ibot, cfg.matryoshka, cfg.gram
    if (d.out_dim is not None and d.out_dim < 1) or d.student_temp <= 0 or d.teacher_temp <= 0:
        bad.append("dino.out_dim must be >= 1 (null = auto); dino.student_temp and dino.teacher_temp > 0")
    r = ib.mask_ratio
    if not (len(r) == 2 and 0 <= r[0] <= r[1] <= 1):
        bad.append(f"ibot.mask_ratio must be [low, high] within [0, 1], got {r}")
    if not 0 <= ib.mask_prob <= 1:
        bad.append(f"ibot.mask_prob must be within [0, 1], got {ib.mask_prob}")
    if any(w <= 0 for w in mt.widths):
        bad.append(f"matryoshka.widths must be positive, got {mt.widths}")
    n_levels = len(set(mt.widths)) or 5
    if mt.loss_weights and len(mt.loss_weights) != n_levels:
        bad.append(f"matryoshka.loss_weights: one weight per level ({n_levels}), got {mt.loss_weights}")
    if cfg.highres.steps < 0:
        bad.append("highres.steps must be >= 0")
    if cfg.crops.canvas < 0:
        bad.append(f"crops.canvas must be >= 0 (0 = auto), got {cfg.crops.canvas}")
    p = cfg.model.patch_size
    for key, size in (("crops.local_size", cfg.crops.local_size), ("highres.local_size", cfg.highres.local_size or p),
                      ("gram.teacher_size", g.teacher_size or p)):
        if p > 0 and not (size > 0 and size % p == 0):
            bad.append(f"{key}={size} must be a positive multiple of model.patch_size={p}")
    if g.enabled and (g.start < 0 or g.refresh_every < 0 or g.weight < 0 or (g.highres_weight or 0) < 0):
        bad.append("gram.start, gram.refresh_every, gram.weight and gram.highres_weight must be >= 0")
    return bad


# ------------------------------------------------------------------------------------------------ benchmark

def synthetic_batch(cfg: RunConfig, device: torch.device) -> dict:
    """Random uint8 crops [B, C, S, S] (2 global + n_local local), plus the iBOT masks the collate draws;
    ``crops.augment=batched``: random uint8 images on a canvas of ``crops.canvas`` (0: the global crop size)."""
    from fovea.masking.block import BlockMasker
    g = torch.Generator().manual_seed(cfg.train.seed)
    b, c, ch = cfg.data.batch_size, cfg.crops, cfg.model.in_chans
    batch: dict[str, Any]
    if c.augment == "batched":  # what the canvas collate sends: the stepper crops it (timed with the step)
        side = c.canvas or c.global_size
        batch = {"images": torch.randint(0, 256, (b, 3, side, side), generator=g, dtype=torch.uint8).to(device),
                 "sizes": torch.full((b, 2), side, dtype=torch.int64).to(device),
                 "keys": torch.stack([torch.zeros(b, dtype=torch.int64), torch.arange(b)], dim=1).to(device),
                 "skipped": 0, "phase": ""}
    else:
        sizes = [c.global_size] * 2 + [c.local_size] * c.n_local + [gram_size(cfg, c.global_size)] * 2
        batch = {"crops": [torch.randint(0, 256, (b, ch, s, s), generator=g, dtype=torch.uint8).to(device)
                           for s in sizes if s], "skipped": 0}
    if cfg.ibot.enabled:
        ib = cfg.ibot
        mk = BlockMasker(c.global_size // cfg.model.patch_size, ib.mask_prob, pair(ib.mask_ratio),
                         ib.mask_min_block, ib.mask_type, ib.mask_roll)
        m = torch.from_numpy(np.stack([mk(cfg.train.seed * 1_000_003 + i, 2) for i in range(b)]))
        batch["masks"] = m.transpose(0, 1).reshape(2 * b, -1).to(device)
    return batch


def flops(cfg: RunConfig, batch: dict) -> dict[str, Any]:
    """FLOPs of one training step from the config alone (multiply-add = 2 FLOPs; matmuls/convs only).

    Per crop of size S: backbone forward (patch embedding, L blocks on its tokens) + the DINO head on the
    CLS token. Step = teacher forward on the 2 global crops (1x) + student forward and backward on all
    crops (3x forward), except the student's patch embedding, whose input needs no gradient (2x); plus
    the Gram teacher's forward on its global crops when the term is on. Element-wise work (norms, GELU,
    softmax, optimizer, EMA) and the iBOT head on the masked patches are not counted.
    """
    c, d = cfg.crops, cfg.dino
    head = head_flops(cfg.model, d.nlayers, d.hidden_dim, d.bottleneck_dim, d.out_dim or 0)
    per_crop = {}
    for kind, size in (("global", c.global_size), ("local", c.local_size)):
        embed, blocks = backbone_flops(cfg.model, size)
        per_crop[kind] = {"patch_embed": embed, "blocks": blocks, "head": head}
    b = cfg.data.batch_size
    n_g, n_l = 2 * b, c.n_local * b
    fwd = {k: sum(v.values()) for k, v in per_crop.items()}
    teacher = n_g * fwd["global"]
    student_fwd = n_g * fwd["global"] + n_l * fwd["local"]
    student_patch = n_g * per_crop["global"]["patch_embed"] + n_l * per_crop["local"]["patch_embed"]
    student_bwd = 2 * student_fwd - student_patch  # no input gradient for the patch-embed conv
    gram = n_g * sum(backbone_flops(cfg.model, gram_size(cfg, c.global_size) or c.global_size)) if cfg.gram.enabled else 0
    return {"per_crop_forward": per_crop, "teacher_forward": teacher, "student_forward": student_fwd,
            "student_backward": student_bwd, "gram_teacher_forward": gram,
            "total": teacher + student_fwd + student_bwd + gram,
            "tokens_per_image": {"student": 2 * per_crop_tokens(cfg, c.global_size)
                                 + c.n_local * per_crop_tokens(cfg, c.local_size),
                                 "teacher": 2 * per_crop_tokens(cfg, c.global_size)}}


def per_crop_tokens(cfg: RunConfig, size: int) -> int:
    return int(cfg.model.cls_token) + cfg.model.num_register_tokens + (size // cfg.model.patch_size) ** 2


def _build(cfg: RunConfig) -> DINO:
    return DINO(cfg)


SPEC = register(MethodSpec(
    names=("dino", "dinov2", "franca", "dinov3"),
    sections=("dino", "ibot", "koleo", "matryoshka", "highres", "gram", "crops"),
    build=_build, train_data=train_data, schedule=schedule, phase=phase, resolve=resolve, check=check,
    synthetic_batch=synthetic_batch, flops=flops, batch_augment=batch_augment))
