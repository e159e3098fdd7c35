"""Frozen features for the k-NN during training and RASA: views of the one feature bank of
:mod:`fovea.eval.bank` (the same forward pass every evaluation uses)."""
from __future__ import annotations

import torch
from torch import Tensor

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD
from fovea.data.sources import ImageSource
from fovea.eval.bank import extract_bank, extract_bank_sharded
from fovea.models.vit import VisionTransformer

FEATURE_KINDS = ("cls", "mean_patch", "both")


def available_kinds(backbone: VisionTransformer, kinds: list[str]) -> list[str]:
    """The feature kinds ``backbone`` can produce, in order, without duplicates.

    A backbone without CLS token (I-JEPA, ``model.cls_token=false``) has no ``cls`` / ``both``
    features: they are replaced by ``mean_patch`` (the protocol of METHODS.md section 5).
    """
    if getattr(backbone, "cls_token", None) is None:
        kinds = ["mean_patch" if k in ("cls", "both") else k for k in kinds]
    return list(dict.fromkeys(kinds))


@torch.no_grad()
def extract_features(backbone: VisionTransformer, source: ImageSource, size: int, kinds: list[str],
                     device: torch.device, batch_size: int = 256, num_workers: int = 2,
                     mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                     progress: bool = True, desc: str = "features") -> tuple[dict[str, Tensor], Tensor, int]:
    """Run ``backbone`` in eval mode over ``source`` at ``size`` px (:func:`~fovea.eval.bank.extract_bank`).

    Returns ({kind: features [N, D_kind] float32 on CPU} for the kinds of
    :meth:`~fovea.eval.bank.FeatureBank.get`, labels [N], number of skipped items).
    """
    bank = extract_bank(backbone, source, size, device, _n_last(kinds), batch_size, num_workers, mean, std,
                        progress, desc)
    return {k: bank.get(k) for k in kinds}, bank.labels, bank.skipped


@torch.no_grad()
def extract_features_sharded(backbone: VisionTransformer, source: ImageSource, size: int, kinds: list[str],
                             device: torch.device, batch_size: int = 256, num_workers: int = 2,
                             mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                             progress: bool = True, desc: str = "features"
                             ) -> tuple[dict[str, Tensor], Tensor, int] | None:
    """:func:`extract_features` shared by the ranks (:func:`~fovea.eval.bank.extract_bank_sharded`): the
    features on rank 0, ``None`` on the others."""
    bank = extract_bank_sharded(backbone, source, size, device, _n_last(kinds), batch_size, num_workers, mean,
                                std, progress, desc)
    return None if bank is None else ({k: bank.get(k) for k in kinds}, bank.labels, bank.skipped)


def _n_last(kinds: list[str]) -> int:
    return 4 if any(k.startswith("cls_last4") for k in kinds) else 1
