"""Methods by name (``cfg.method``): the method object and the training data it consumes."""
from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from fovea.config.schema import RunConfig
from fovea.data.sources import ImageSource
from fovea.methods.base import Method

METHODS = ("dino", "ijepa")


def build_method(cfg: RunConfig) -> Method:
    """Instantiate the method named by ``cfg.method``."""
    if cfg.method == "dino":
        from fovea.methods.dino import DINO
        return DINO(cfg)
    if cfg.method == "ijepa":
        from fovea.methods.ijepa import IJEPA
        return IJEPA(cfg)
    raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")


def build_train_data(cfg: RunConfig, source: ImageSource) -> tuple[Dataset, Callable[[list], dict]]:
    """(dataset keyed by (epoch, index), collate function) for ``cfg.method``.

    DINO: multi-crop views, batch ``{"crops": [...]}``. I-JEPA: one view + multi-block masks.
    """
    if cfg.method == "dino":
        from fovea.data.augment import MultiCrop
        from fovea.data.loader import MultiCropDataset, collate_multicrop
        return MultiCropDataset(source, MultiCrop(cfg.crops), cfg.train.seed), collate_multicrop
    if cfg.method == "ijepa":
        from fovea.data.single_view import MaskCollate, SingleView, SingleViewDataset
        from fovea.masking.multiblock import MultiBlockSampler
        c, j = cfg.crops, cfg.ijepa
        view = SingleView(c.global_size, j.crop_scale, c.ratio, j.flip_p, c.interpolation)
        grid = c.global_size // cfg.model.patch_size
        sampler = MultiBlockSampler(grid, grid, j.num_targets, tuple(j.target_scale), tuple(j.target_aspect),
                                    tuple(j.context_scale), tuple(j.context_aspect), j.min_context)
        return SingleViewDataset(source, view, cfg.train.seed), MaskCollate(sampler, j.equalize)
    raise ValueError(f"unknown method {cfg.method!r}; available: {', '.join(METHODS)}")
