"""Probe features and depth labels of one split: extracted once and cached (the backbone is frozen and there is
no augmentation but the optional flip, whose features are cached too) or computed batch by batch (a set too
large to cache, such as the 24k-pair NYU train split). Everything on ``device`` only per batch."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fovea.eval.depth.data import Pair, input_size, read_pair, resize_rgb
from fovea.eval.depth.probe import extract_features
from fovea.eval.plugin import EvalContext

#: --cache auto caches when the features and labels of the train split take at most this many bytes
CACHE_LIMIT = 4 * 2 ** 30


class SplitStore:
    """Pairs of a split with their input sizes; ``keys[i]`` = (input size, label size) groups batchable pairs.

    ``size`` is the --size rule of :func:`fovea.eval.depth.data.input_size`; ``blocks`` / ``features`` as in
    :func:`fovea.eval.depth.probe.extract_features`. Unreadable RGB images met while reading are left out
    and their relative paths appended to ``skipped``.
    """

    def __init__(self, ctx: EvalContext, pairs: Sequence[Pair], size: int, blocks: Sequence[int], features: str,
                 flip: bool = False) -> None:
        self.ctx, self.blocks, self.features, self.flip = ctx, list(blocks), features, flip
        self.pairs = list(pairs)
        self.in_sizes = [input_size(p.size, size, ctx.patch_size) for p in self.pairs]
        self.skipped: list[str] = []
        self.feats: list[Tensor] | None = None
        self.feats_flip: list[Tensor] | None = None
        self.labels: list[Tensor] | None = None

    @property
    def keys(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        return [(s, p.size) for s, p in zip(self.in_sizes, self.pairs)]

    def cache_bytes(self, channels: int) -> int:
        """Bytes the cache of this split would take (float32 features, x2 with flip, and labels)."""
        p = self.ctx.patch_size
        f = sum(channels * (h // p) * (w // p) * 4 for h, w in self.in_sizes) * (2 if self.flip else 1)
        return f + sum(h * w * 4 for h, w in (q.size for q in self.pairs))

    def _features(self, imgs: list[np.ndarray], hw: tuple[int, int]) -> Tensor:
        """uint8 images (any size) -> probe features [B, C, h, w] on the device."""
        x = self.ctx.to_input(np.stack([resize_rgb(im, hw) for im in imgs]))
        return extract_features(self.ctx.backbone, x, self.blocks, self.features)

    def iter_batches(self, batch: int, progress: bool = False, desc: str = "depth features"
                     ) -> Iterator[tuple[list[int], list[np.ndarray], np.ndarray, Tensor]]:
        """Every readable pair once, in batches of equal key (list order within a key): (indices, RGB images
        uint8 [H, W, 3], depth labels float32 [B, H, W] metres, features [B, C, h, w] on the device)."""
        groups: dict[object, list[int]] = {}
        for i, k in enumerate(self.keys):
            groups.setdefault(k, []).append(i)
        bar = tqdm(total=len(self.pairs), desc=desc, disable=not progress, leave=False)
        for g in groups.values():
            for lo in range(0, len(g), batch):
                idx, imgs, deps = [], [], []
                for i in g[lo:lo + batch]:
                    r = read_pair(self.pairs[i])
                    if r is None:
                        self.skipped.append(self.pairs[i].rel)
                        continue
                    idx.append(i)
                    imgs.append(r[0])
                    deps.append(r[1])
                bar.update(len(g[lo:lo + batch]))
                if idx:
                    yield idx, imgs, np.stack(deps), self._features(imgs, self.in_sizes[idx[0]])
        bar.close()

    def build_cache(self, batch: int, progress: bool = False) -> None:
        """Extract and keep (on CPU) the features (and those of the mirrored images with ``flip``) and labels
        of every readable pair; unreadable ones are dropped from the split."""
        feats: dict[int, Tensor] = {}
        flipped: dict[int, Tensor] = {}
        labels: dict[int, Tensor] = {}
        for idx, imgs, deps, f in self.iter_batches(batch, progress, "depth train features"):
            if self.flip:
                ff = self._features([np.ascontiguousarray(im[:, ::-1]) for im in imgs], self.in_sizes[idx[0]])
            for j, i in enumerate(idx):
                feats[i] = f[j].cpu()
                labels[i] = torch.from_numpy(deps[j])
                if self.flip:
                    flipped[i] = ff[j].cpu()
        keep = sorted(feats)
        self.pairs = [self.pairs[i] for i in keep]
        self.in_sizes = [self.in_sizes[i] for i in keep]
        self.feats = [feats[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.feats_flip = [flipped[i] for i in keep] if self.flip else None

    def get(self, idx: list[int], flips: list[bool]) -> tuple[Tensor, Tensor] | None:
        """Training batch: (features [B, C, h, w], labels [B, H, W] metres) on the device, sample j mirrored
        (image and label) when ``flips[j]``; None when no image of the batch is readable."""
        dev = self.ctx.device
        if self.feats is not None and self.labels is not None:
            fs = [(self.feats_flip[i] if (fl and self.feats_flip is not None) else self.feats[i]) for i, fl in
                  zip(idx, flips)]
            gs = [self.labels[i].flip(-1) if fl else self.labels[i] for i, fl in zip(idx, flips)]
            return torch.stack(fs).to(dev), torch.stack(gs).to(dev)
        imgs, deps = [], []
        for i, fl in zip(idx, flips):
            r = read_pair(self.pairs[i])
            if r is None:
                if self.pairs[i].rel not in self.skipped:
                    self.skipped.append(self.pairs[i].rel)
                continue
            im, d = r
            imgs.append(np.ascontiguousarray(im[:, ::-1]) if fl else im)
            deps.append(np.ascontiguousarray(d[:, ::-1]) if fl else d)
        if not imgs:
            return None
        return self._features(imgs, self.in_sizes[idx[0]]), torch.from_numpy(np.stack(deps)).to(dev)
