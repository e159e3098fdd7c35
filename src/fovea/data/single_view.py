"""Single-view data for I-JEPA: one RandomResizedCrop per image, masks drawn in the collate.

Every sample is a pure function of (seed, epoch, index): the crop pipeline is re-seeded per
sample, and the collate draws that sample's masks from a generator seeded by another value
derived from the same key. So a resumed run, or a run split over ranks, sees the same pixels
and the same masks (padding keeps each image's masks independent of the batch; the
``subsample`` mode additionally draws the kept subset from a per-batch seed made of the batch's keys).
"""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from fovea.data.augment import _INTERP
from fovea.data.loader import sample_seed
from fovea.data.sources import ImageSource, fetch_with_replacement
from fovea.masking.multiblock import MultiBlockSampler, pad_indices, subsample_indices

MASK_STREAM = 7919  # offsets the mask seed from the crop seed of the same sample


class SingleView:
    """Image HxWx3 uint8 -> one uint8 [3, S, S] view (RandomResizedCrop, optional flip; no colour ops)."""

    def __init__(self, size: int, scale: list[float], ratio: list[float], flip_p: float = 0.0,
                 interpolation: str = "bicubic") -> None:
        ops: list[A.BasicTransform] = [A.RandomResizedCrop((size, size), scale=tuple(scale), ratio=tuple(ratio),
                                                           interpolation=_INTERP[interpolation])]
        if flip_p > 0:
            ops.append(A.HorizontalFlip(p=flip_p))
        self.pipe = A.Compose(ops, seed=0)

    def __call__(self, img: np.ndarray, seed: int) -> torch.Tensor:
        self.pipe.set_random_seed(seed)
        out = self.pipe(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))


class SingleViewDataset(Dataset):
    """Item key (epoch, index) -> (uint8 view [3,S,S], mask seed, number of unreadable items skipped)."""

    def __init__(self, source: ImageSource, transform: SingleView, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        epoch, index = key
        img, _, skipped = fetch_with_replacement(self.source, index)
        view = self.transform(img, sample_seed(self.seed, epoch, index))
        return view, sample_seed(self.seed + MASK_STREAM, epoch, index), skipped


class MaskCollate:
    """Stacks views and draws each image's I-JEPA masks from its own seed.

    -> {"images": uint8 [B,3,S,S], "ctx_idx": long [B,Nc], "ctx_valid": bool [B,Nc],
        "tgt_idx": long [B,M,Nt], "tgt_valid": bool [B,M,Nt], "skipped": int}.
    """

    def __init__(self, sampler: MultiBlockSampler, equalize: str = "pad") -> None:
        if equalize not in ("pad", "subsample"):
            raise ValueError(f"equalize: {equalize!r} not pad/subsample")
        self.sampler, self.equalize = sampler, equalize

    def __call__(self, items: list[tuple[torch.Tensor, int, int]]) -> dict:
        draws = [self.sampler.sample(np.random.default_rng(it[1])) for it in items]
        b, m = len(items), self.sampler.m
        tgts = [t for d in draws for t in d.targets]  # b-major: image i's block j is row i*M + j
        if self.equalize == "pad":
            ctx_idx, ctx_valid = pad_indices([d.context for d in draws])
            tgt_idx, tgt_valid = pad_indices(tgts)
        else:
            rng = np.random.default_rng([it[1] for it in items])
            ctx_idx, ctx_valid = subsample_indices([d.context for d in draws], rng)
            tgt_idx, tgt_valid = subsample_indices(tgts, rng)
        return {"images": torch.stack([it[0] for it in items]), "ctx_idx": ctx_idx, "ctx_valid": ctx_valid,
                "tgt_idx": tgt_idx.reshape(b, m, -1), "tgt_valid": tgt_valid.reshape(b, m, -1),
                "skipped": sum(it[2] for it in items)}
