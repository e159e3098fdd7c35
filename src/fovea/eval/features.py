"""Frozen-feature extraction shared by the evaluation protocols."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fovea.data.loader import EvalDataset, make_eval_loader
from fovea.data.sources import ImageSource
from fovea.models.vit import Features, VisionTransformer

FEATURE_KINDS = ("cls", "mean_patch", "both")


def available_kinds(backbone: VisionTransformer, kinds: list[str]) -> list[str]:
    """The feature kinds ``backbone`` can produce, in order, without duplicates.

    A backbone without CLS token (I-JEPA, ``model.cls_token=false``) has no ``cls`` / ``both``
    features: they are replaced by ``mean_patch`` (the protocol of METHODS.md section 5).
    """
    if getattr(backbone, "cls_token", None) is None:
        kinds = ["mean_patch" if k in ("cls", "both") else k for k in kinds]
    return list(dict.fromkeys(kinds))


def pool_features(out: Features, kind: str) -> Tensor:
    """Backbone features -> [B, D] (cls, mean_patch) or [B, 2D] (both: each part L2-normalised)."""
    cls, patches = out.cls, out.patches
    if kind == "mean_patch":
        return patches.mean(1)
    if cls is None and kind in ("cls", "both"):
        raise ValueError(f"feature kind {kind!r} needs a CLS token; this backbone has none (use mean_patch)")
    assert cls is not None
    if kind == "cls":
        return cls
    if kind == "both":
        return torch.cat([F.normalize(cls, dim=1), F.normalize(patches.mean(1), dim=1)], dim=1)
    raise ValueError(f"unknown feature kind {kind!r}; choose one of {FEATURE_KINDS}")


@torch.no_grad()
def extract_features(backbone: VisionTransformer, source: ImageSource, size: int, kinds: list[str],
                     device: torch.device, batch_size: int = 256, num_workers: int = 2,
                     mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                     progress: bool = True, desc: str = "features") -> tuple[dict[str, Tensor], Tensor, int]:
    """Run ``backbone`` in eval mode over ``source`` at ``size`` px.

    Returns ({kind: features [N, D_kind] float32 on CPU}, labels [N], number of skipped items).
    """
    was_training = backbone.training
    backbone.eval()
    loader = make_eval_loader(EvalDataset(source, size), batch_size, num_workers)
    feats: dict[str, list[Tensor]] = {k: [] for k in kinds}
    labels, skipped = [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = normalize(batch["images"].to(device, non_blocking=True), list(mean), list(std))
        with autocast:
            out = backbone.forward_features(x)
        for k in kinds:
            feats[k].append(pool_features(out, k).float().cpu())
        labels.append(batch["labels"])
        skipped += batch["skipped"]
    backbone.train(was_training)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels), skipped
