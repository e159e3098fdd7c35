"""Methods by name (``cfg.method``): the method object and the training data it consumes."""
from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from fovea.config.schema import RunConfig
from fovea.data.sources import ImageSource
from fovea.methods.base import Method

METHODS = ("dino", "dinov2", "franca", "ijepa")


def build_method(cfg: RunConfig) -> Method:
    """Instantiate the method named by ``cfg.method``."""
    if cfg.method in ("dino", "dinov2", "franca"):  # one self-distillation family; keys select the parts
        from fovea.methods.dino import DINO
        return DINO(cfg)
    if cfg.method == "ijepa":
        from fovea.methods.ijepa import IJEPA
        return IJEPA(cfg)
    raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")


def multicrop_dataset(cfg: RunConfig, source: ImageSource, highres: bool = False) -> Dataset:
    """Multi-crop dataset (+ iBOT block masks of the global crops); ``highres``: the high-res phase sizes."""
    import copy

    from fovea.data.augment import MultiCrop
    from fovea.data.loader import MultiCropDataset
    from fovea.masking.block import BlockMasker
    crops = copy.deepcopy(cfg.crops)
    if highres:
        crops.global_size = cfg.highres.global_size or crops.global_size
        crops.local_size = cfg.highres.local_size or crops.local_size
    masker = None
    if cfg.ibot.enabled:
        ib = cfg.ibot
        masker = BlockMasker(crops.global_size // cfg.model.patch_size, ib.mask_prob, tuple(ib.mask_ratio),
                             ib.mask_min_block, ib.mask_type, ib.mask_roll)
    return MultiCropDataset(source, MultiCrop(crops), cfg.train.seed, masker)


def ijepa_collate(cfg: RunConfig) -> Callable[[list], dict]:
    """I-JEPA collate: stacks the views and draws each image's multi-block masks from its own seed."""
    from fovea.data.single_view import MaskCollate
    from fovea.masking.multiblock import MultiBlockSampler
    j = cfg.ijepa
    grid = cfg.crops.global_size // cfg.model.patch_size
    sampler = MultiBlockSampler(grid, grid, j.num_targets, tuple(j.target_scale), tuple(j.target_aspect),
                                tuple(j.context_scale), tuple(j.context_aspect), j.min_context)
    return MaskCollate(sampler, j.equalize)


def build_train_data(cfg: RunConfig, source: ImageSource, highres: bool = False
                     ) -> tuple[Dataset, Callable[[list], dict]]:
    """(dataset keyed by (epoch, index), collate function) for ``cfg.method``.

    DINO / DINOv2: multi-crop views (+ iBOT masks), batch ``{"crops": [...], "masks"?}``;
    ``highres`` selects the high-resolution phase's crop sizes. I-JEPA: one view + multi-block masks.
    """
    if cfg.method in ("dino", "dinov2", "franca"):
        from fovea.data.loader import collate_multicrop
        return multicrop_dataset(cfg, source, highres), collate_multicrop
    if cfg.method == "ijepa":
        from fovea.data.single_view import SingleView, SingleViewDataset
        c, j = cfg.crops, cfg.ijepa
        view = SingleView(c.global_size, j.crop_scale, c.ratio, j.flip_p, c.interpolation)
        return SingleViewDataset(source, view, cfg.train.seed), ijepa_collate(cfg)
    raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
