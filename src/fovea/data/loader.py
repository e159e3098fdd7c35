"""Datasets, the resumable distributed batch sampler, and collate functions.

The sampler draws a global permutation per epoch from (seed, epoch); global batch ``s`` is
``perm[s*G:(s+1)*G]`` with ``G = batch * world``, and rank ``r`` takes its ``r``-th slice. So one
process with batch G and W processes with batch G/W see the same images, and a run resumed at
step ``s`` continues with exactly the batch it would have drawn.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from typing import Callable, Iterator, Sized, cast

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fovea.data.augment import MultiCrop, eval_transform
from fovea.data.sources import ImageSource, fetch_with_replacement
from fovea.masking.block import BlockMasker



STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals(worker_id: int) -> None:
    """Worker start-up: ignore SIGINT / SIGTERM. A Ctrl-C or a pre-emption signal sent to the whole
    process group then reaches only the main process, which finishes its step and saves (the workers
    end with it); a worker killed by the signal would otherwise abort the step with a loader error.
    Workers started inside :func:`stop_signals_blocked` hold such a signal blocked until this runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT / SIGTERM in the main thread while data-loader workers start (``iter(loader)``):
    the forked workers inherit the blocked mask, so a signal that arrives before their
    :func:`ignore_stop_signals` cannot kill them. The main process still receives it (through another
    of its threads, or when the mask is restored) and its handler asks the run to stop."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed that is a pure function of (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] >> 1)


class MultiCropDataset(Dataset):
    """Item key (epoch, index) -> (uint8 crops [3,S,S], unreadable items skipped, masks or None).

    With a ``masker`` (iBOT), the item also holds bool masks [2, Np] of the two global crops, drawn
    from the same per-sample seed as the crops (a pure function of (seed, epoch, index)).
    """

    def __init__(self, source: ImageSource, transform: MultiCrop, seed: int,
                 masker: BlockMasker | None = None) -> None:
        self.source, self.transform, self.seed, self.masker = source, transform, seed, masker

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int, torch.Tensor | None]:
        epoch, index = key
        img, _, skipped = fetch_with_replacement(self.source, index)
        s = sample_seed(self.seed, epoch, index)
        masks = torch.from_numpy(self.masker(s, 2)) if self.masker is not None else None
        return self.transform(img, s), skipped, masks


def to_canvas(img: np.ndarray, canvas: int) -> tuple[np.ndarray, tuple[int, int]]:
    """HxWx3 uint8 -> (uint8 [3, canvas, canvas], (h, w)): an image larger than the canvas is downscaled to fit
    (aspect ratio kept, cv2 INTER_AREA), a smaller one is not upscaled; either is placed top-left, the rest
    zero padded; (h, w) is its size on the canvas."""
    h, w = img.shape[:2]
    if max(h, w) > canvas:
        r = canvas / max(h, w)
        h, w = min(canvas, max(1, round(h * r))), min(canvas, max(1, round(w * r)))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    out = np.zeros((3, canvas, canvas), dtype=np.uint8)
    out[:, :h, :w] = img.transpose(2, 0, 1)
    return out, (h, w)


def auto_canvas(source: ImageSource, cap: int, n: int = 16) -> int:
    """``crops.canvas=0``: the longest side among up to ``n`` images decoded at evenly spread indices (the
    same ones on every rank and at every resume), at most ``cap``; ``cap`` when none decodes. Fixed-size
    sets (CIFAR-10 32 px, Fashion-MNIST 28 px) get their own size; large or varied images get ``cap``."""
    total = len(source)
    longest = 0
    for i in np.unique(np.linspace(0, max(total - 1, 0), num=max(1, min(n, total))).round()).astype(np.int64):
        img = source.load(int(i)) if total else None
        if img is not None:
            longest = max(longest, int(max(img.shape[:2])))
    return min(cap, longest) if longest else cap


class CanvasDataset(Dataset):
    """Item key (epoch, index) -> (uint8 [3, C, C] image on the canvas, (h, w), (epoch, index), skipped, masks).

    The data side of ``crops.augment=batched``: the image is only decoded and put on the canvas (see
    :func:`to_canvas`); :class:`~fovea.data.batch_augment.BatchedMultiCrop` crops it on the training device.
    The iBOT ``masker``'s masks are drawn exactly as :class:`MultiCropDataset` draws them.
    """

    def __init__(self, source: ImageSource, canvas: int, seed: int, masker: BlockMasker | None = None) -> None:
        self.source, self.canvas, self.seed, self.masker = source, canvas, seed, masker

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], int,
                                                         torch.Tensor | None]:
        epoch, index = key
        img, _, skipped = fetch_with_replacement(self.source, index)
        masks = torch.from_numpy(self.masker(sample_seed(self.seed, epoch, index), 2)) if self.masker is not None \
            else None
        out, size = to_canvas(img, self.canvas)
        return torch.from_numpy(out), size, (int(epoch), int(index)), skipped, masks


class CanvasCollate:
    """Items of :class:`CanvasDataset` -> {"images": uint8 [B,3,C,C], "sizes": int64 [B,2] (h, w),
    "keys": int64 [B,2] (epoch, index), "skipped": int, "phase": the data phase}, plus "masks" as
    :func:`collate_multicrop` lays them out (bool [2B, Np]) when the items hold masks."""

    def __init__(self, phase: str = "") -> None:
        self.phase = phase

    def __call__(self, items: list[tuple]) -> dict:
        out: dict = {"images": torch.stack([it[0] for it in items]),
                     "sizes": torch.tensor([it[1] for it in items], dtype=torch.int64),
                     "keys": torch.tensor([it[2] for it in items], dtype=torch.int64),
                     "skipped": sum(it[3] for it in items), "phase": self.phase}
        if items[0][4] is not None:
            out["masks"] = torch.stack([it[4] for it in items]).transpose(0, 1).reshape(-1, items[0][4].shape[-1])
        return out


class EvalDataset(Dataset):
    """Index -> (uint8 [3,S,S] evaluation view, label, skipped)."""

    def __init__(self, source: ImageSource, size: int) -> None:
        self.source, self.size = source, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img, used, skipped = fetch_with_replacement(self.source, index)
        return eval_transform(img, self.size), int(self.source.labels[used]), skipped


class EpochBatchSampler(Sampler):
    """Yields this rank's batches of (epoch, index) keys for one epoch, from ``start_step`` on."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                 start_step: int = 0) -> None:
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.epoch, self.start_step = seed, epoch, start_step

    @staticmethod
    def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
        """Full global batches per epoch (the remainder is dropped)."""
        return n // (batch_size * world)

    def __len__(self) -> int:
        return max(self.steps_per_epoch(self.n, self.b, self.world) - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.b * self.world
        for s in range(self.start_step, self.steps_per_epoch(self.n, self.b, self.world)):
            lo = s * gb + self.rank * self.b
            yield [(self.epoch, i) for i in perm[lo:lo + self.b]]


def collate_multicrop(items: list[tuple]) -> dict:
    """-> {"crops": [crop_i stacked over the batch: uint8 [B,3,S_i,S_i]], "skipped": int}, plus
    "masks": bool [2B, Np] (rows: global crop 1 of every image, then global crop 2) when items hold masks."""
    n_crops = len(items[0][0])
    crops = [torch.stack([it[0][i] for it in items]) for i in range(n_crops)]
    out = {"crops": crops, "skipped": sum(it[1] for it in items)}
    if len(items[0]) > 2 and items[0][2] is not None:
        out["masks"] = torch.stack([it[2] for it in items]).transpose(0, 1).reshape(-1, items[0][2].shape[-1])
    return out


def collate_eval(items: list[tuple[torch.Tensor, int, int]]) -> dict:
    """-> {"images": uint8 [B,3,S,S], "labels": int64 [B], "skipped": int}."""
    return {"images": torch.stack([it[0] for it in items]),
            "labels": torch.tensor([it[1] for it in items], dtype=torch.long),
            "skipped": sum(it[2] for it in items)}


def make_train_loader(ds: Dataset, batch_size: int, rank: int, world: int, seed: int, epoch: int,
                      start_step: int, num_workers: int, pin_memory: bool = False,
                      collate_fn: Callable[[list], dict] = collate_multicrop) -> DataLoader:
    """DataLoader over one epoch (from ``start_step``) with a private generator (leaves global RNG alone).

    ``ds`` is keyed by (epoch, index); ``collate_fn`` is the method's (multi-crop by default). The workers
    persist: move the loader to another epoch with :func:`set_epoch` and iterate it again (the batches are
    drawn in the main process, so the workers need not restart).
    """
    sampler = EpochBatchSampler(len(cast(Sized, ds)), batch_size, rank, world, seed, epoch, start_step)
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=ignore_stop_signals if num_workers else None,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)


def set_epoch(loader: DataLoader, epoch: int, start_step: int) -> DataLoader:
    """Point a loader of :func:`make_train_loader` at ``epoch`` from ``start_step`` (its workers stay)."""
    sampler = cast(EpochBatchSampler, loader.batch_sampler)
    sampler.epoch, sampler.start_step = epoch, start_step
    return loader


def make_eval_loader(ds: EvalDataset, batch_size: int, num_workers: int) -> DataLoader:
    """Sequential loader over an evaluation source."""
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_eval,
                      generator=torch.Generator().manual_seed(0),
                      worker_init_fn=ignore_stop_signals if num_workers else None)
