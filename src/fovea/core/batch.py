"""Moving batches (dicts of tensors and lists of tensors) to a device."""
from __future__ import annotations

import torch


def to_device(v: object, device: torch.device) -> object:
    """Move a tensor, or the tensors of a list, to ``device`` (other values unchanged)."""
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, (list, tuple)):
        return [to_device(x, device) for x in v]
    return v


def batch_size_of(batch: dict) -> int:
    """Images in a training batch: the leading size of ``images`` or of the first of ``crops``."""
    first = batch["images"] if "images" in batch else batch["crops"][0]
    return int(first.shape[0])


def split_batch(batch: dict, n: int) -> list[dict]:
    """``n`` micro-batches of equal size, images in order (gradient accumulation).

    Every tensor whose leading size is ``k * B`` (B images; k = 1 for per-image rows, k = 2 for the iBOT
    masks' rows of global crop 1 then global crop 2) is cut per block of B rows, so each micro-batch keeps
    the layout of a batch; lists of such tensors (the crops) are cut item by item; other values (counts
    such as ``skipped``) go with the first micro-batch (0 elsewhere when numeric)."""
    if n == 1:
        return [batch]
    b = batch_size_of(batch)
    if b % n:
        raise ValueError(f"a batch of {b} images does not split into {n} equal micro-batches")
    m = b // n

    def cut(v: object, i: int) -> object:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] % b == 0:
            k = v.shape[0] // b
            return v.reshape(k, b, *v.shape[1:])[:, i * m:(i + 1) * m].reshape(k * m, *v.shape[1:])
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, torch.Tensor) for x in v):
            return [cut(x, i) for x in v]
        if i == 0:
            return v
        return 0 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    return [{k: cut(v, i) for k, v in batch.items()} for i in range(n)]
