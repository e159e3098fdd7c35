"""Frozen-feature banks shared by every image-level protocol, cached on disk per run.

One pass of the backbone over a labelled source keeps everything the protocols need:
the CLS token of the last ``n`` blocks (each through the final LayerNorm, DINOv2's
``get_intermediate_layers(norm=True)``), the mean patch token of the last block and the
register tokens. Feature kinds are then views of the bank (:meth:`FeatureBank.get`), with an
optional Matryoshka width suffix ``kind@W`` keeping the first ``W`` channels of each part.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from fovea.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from fovea.data.loader import EvalDataset, make_eval_loader
from fovea.data.sources import ImageSource
from fovea.models.vit import VisionTransformer
from fovea.core.checkpoint import save_atomic

BANK_KINDS = ("cls", "mean_patch", "both", "cls_last4", "cls_last4_mean", "registers")


@dataclass
class FeatureBank:
    """Frozen features of N images.

    cls [N, n, D] (CLS of the last n blocks, oldest first: ``cls[:, -1]`` is the final CLS),
    mean_patch [N, D] (last block), registers [N, R, D] (R may be 0), labels [N] int64.
    A backbone without CLS token (I-JEPA) has ``has_cls=False``: the ``cls`` slots then hold each
    block's mean patch token (through the final LayerNorm), the pooled feature I-JEPA is evaluated on,
    so ``cls[:, -1]`` equals ``mean_patch`` and ``cls_last4`` is the last 4 blocks' mean patch tokens.
    """

    cls: Tensor
    mean_patch: Tensor
    registers: Tensor
    labels: Tensor
    has_cls: bool = True
    skipped: int = 0  # unreadable items of the source (each replaced by the next readable one)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get(self, kind: str) -> Tensor:
        """Feature matrix [N, D_kind] for ``kind`` (see BANK_KINDS), optionally ``kind@W``.

        cls: final CLS [N, D]; mean_patch [N, D]; both: L2-normalised CLS and mean patch [N, 2D];
        cls_last4: CLS of the last 4 blocks [N, 4D]; cls_last4_mean: that plus mean patch [N, 5D];
        registers: mean register token [N, D]. ``@W`` keeps the first W channels of each part
        (Matryoshka widths) before concatenation.
        """
        base, _, w = kind.partition("@")
        width = int(w) if w else None
        cut = (lambda t: t[..., :width]) if width else (lambda t: t)  # noqa: E731
        if base == "cls":
            return cut(self.cls[:, -1])
        if base == "mean_patch":
            return cut(self.mean_patch)
        if base == "both":
            return torch.cat([F.normalize(cut(self.cls[:, -1]), dim=1), F.normalize(cut(self.mean_patch), dim=1)], 1)
        if base in ("cls_last4", "cls_last4_mean"):
            n = min(4, self.cls.shape[1])
            parts = [cut(self.cls[:, -n:]).flatten(1)]
            if base == "cls_last4_mean":
                parts.append(cut(self.mean_patch))
            return torch.cat(parts, 1)
        if base == "registers":
            if self.registers.shape[1] == 0:
                raise ValueError("this backbone has no register tokens (feature kind 'registers')")
            return cut(self.registers.mean(1))
        raise ValueError(f"unknown feature kind {kind!r}; choose one of {BANK_KINDS} (optionally kind@WIDTH)")

    def subset(self, idx: Tensor) -> "FeatureBank":
        """The bank restricted to rows ``idx`` [M]."""
        return FeatureBank(self.cls[idx], self.mean_patch[idx], self.registers[idx], self.labels[idx], self.has_cls)

    def state(self) -> dict:
        return {"cls": self.cls, "mean_patch": self.mean_patch, "registers": self.registers, "labels": self.labels,
                "has_cls": self.has_cls, "skipped": self.skipped}


def forward_bank(backbone: VisionTransformer, x: Tensor, n_last: int) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised image batch [B, 3, H, W] (any multiple of the patch size) ->
    (CLS of the last n blocks [B, n, D], mean patch of the last block [B, D], registers [B, R, D]).

    Token layout ``[CLS?, registers..., patches...]``; without a CLS token (I-JEPA) each block's
    slot holds its mean patch token (patches through the final LayerNorm, then averaged). The last
    block's patch tokens go through the backbone's patch projection (a folded RASA map) like
    ``forward_features(x).patches``.
    """
    t = backbone.prepare_tokens(x)
    rope = backbone.rope_for(x)
    c, np_ = backbone.n_cls, backbone.n_prefix
    first = backbone.depth - n_last
    cls = []
    last_i = backbone.depth - 1
    for i, blk in enumerate(backbone.block_list):
        t = blk(t, rope=rope)
        if i >= first:
            pooled = backbone.norm(t[:, np_:]) if i < last_i else backbone.project_patches(backbone.norm(t[:, np_:]))
            cls.append(backbone.norm(t[:, :1]) if c else pooled.mean(1, keepdim=True))
    last = backbone.norm(t)
    return torch.cat(cls, 1), backbone.project_patches(last[:, np_:]).mean(1), last[:, c:np_]


def _sharded() -> tuple[int, int]:
    """(rank, world) of the default process group, (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def extract_bank(backbone: VisionTransformer, source: ImageSource, size: int, device: torch.device,
                 n_last: int = 4, batch_size: int = 256, num_workers: int = 0,
                 mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                 progress: bool = True, desc: str = "features") -> FeatureBank:
    """Run ``backbone`` (eval mode) over ``source`` at ``size`` px; features float32 on CPU."""
    return _extract(backbone, source, size, device, n_last, batch_size, num_workers, mean, std, progress, desc)


@torch.no_grad()
def extract_bank_sharded(backbone: VisionTransformer, source: ImageSource, size: int, device: torch.device,
                         n_last: int = 4, batch_size: int = 256, num_workers: int = 0,
                         mean: list[float] | tuple = IMAGENET_MEAN, std: list[float] | tuple = IMAGENET_STD,
                         progress: bool = True, desc: str = "features") -> FeatureBank | None:
    """:func:`extract_bank` shared by the ranks of the default process group: every rank extracts items
    ``rank::W`` and rank 0 gathers them back into the source's order and returns the bank; the other ranks
    return ``None``. Every rank must call it (no rank waits at a barrier while rank 0 extracts alone).
    Without a process group it is :func:`extract_bank`."""
    rank, world = _sharded()
    if world > 1:
        import numpy as np
        import torch.distributed as dist

        from fovea.data.sources import SubsetSource
        mine = np.arange(rank, len(source), world)
        part = _extract(backbone, SubsetSource(source, mine, f"rank {rank} of {world}"), size, device, n_last,
                        batch_size, num_workers, mean, std, progress and rank == 0, desc)
        got: list = [None] * world if rank == 0 else []
        dist.gather_object(part.state(), got if rank == 0 else None, dst=0)
        if rank != 0:
            return None
        banks = [FeatureBank(**g) for g in got]
        order = torch.from_numpy(np.argsort(np.concatenate([np.arange(r, len(source), world) for r in range(world)]),
                                            kind="stable"))
        cat = lambda name: torch.cat([getattr(b, name) for b in banks])[order]  # noqa: E731
        return FeatureBank(cat("cls"), cat("mean_patch"), cat("registers"), cat("labels"), banks[0].has_cls,
                           sum(b.skipped for b in banks))
    return extract_bank(backbone, source, size, device, n_last, batch_size, num_workers, mean, std, progress, desc)


def _extract(backbone: VisionTransformer, source: ImageSource, size: int, device: torch.device, n_last: int,
             batch_size: int, num_workers: int, mean: list[float] | tuple, std: list[float] | tuple,
             progress: bool, desc: str) -> FeatureBank:
    was_training = backbone.training
    backbone.eval()
    n_last = max(1, min(n_last, backbone.depth))
    loader = make_eval_loader(EvalDataset(source, size), batch_size, num_workers)
    outs: list[tuple[Tensor, Tensor, Tensor]] = []
    labels, skipped = [], 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = normalize(batch["images"].to(device, non_blocking=True), list(mean), list(std))
        with autocast:
            c, m, r = forward_bank(backbone, x, n_last)
        outs.append((c.float().cpu(), m.float().cpu(), r.float().cpu()))
        labels.append(batch["labels"])
        skipped += int(batch["skipped"])
    backbone.train(was_training)
    return FeatureBank(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]),
                       torch.cat([o[2] for o in outs]), torch.cat(labels), backbone.n_cls > 0, skipped)


def cache_key(checkpoint: str | Path, which: str, source: ImageSource, size: int, n_last: int) -> str:
    """A short hash of everything the features depend on (checkpoint file identity, data, size)."""
    p = Path(checkpoint)
    st = os.stat(p)
    ident = {"ckpt": str(p.resolve()), "mtime": st.st_mtime_ns, "bytes": st.st_size, "which": which,
             "source": source.name, "n": len(source), "size": size, "n_last": n_last, "v": 2}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_bank(cache_dir: str | Path | None, key: str, compute) -> tuple[FeatureBank, bool]:
    """Load bank ``key`` from ``cache_dir``, or call ``compute()`` and store it (atomic write).

    Returns (bank, whether it came from the cache). ``cache_dir=None`` disables caching.
    """
    if cache_dir is not None:
        path = Path(cache_dir) / f"bank_{key}.pt"
        if path.exists():
            try:
                return FeatureBank(**torch.load(path, map_location="cpu", weights_only=True)), True
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
                path.unlink(missing_ok=True)
    bank = compute()
    if cache_dir is not None:
        save_atomic(bank.state(), Path(cache_dir) / f"bank_{key}.pt")
    return bank, False


def split_train_val(labels: Tensor, val_fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified random split of indices of ``labels`` [N] -> (train idx, val idx)."""
    g = torch.Generator().manual_seed(seed)
    tr, va = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if val_fraction > 0 and len(idx) > 1 else 0
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values
