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
