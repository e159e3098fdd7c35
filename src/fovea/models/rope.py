"""Axial 2-D rotary position embedding of the DINOv3 backbone (METHODS.md section 5b).

Patch centres sit at ``((i + 0.5) / H, (j + 0.5) / W)``, mapped to [-1, 1] per axis. Per head (width
d) there are d/4 periods ``base ** (2k / (d/2))`` (base 100, stored as the ``periods`` buffer as in the
released weights); the angles ``2 pi coord / period`` of the row and of the column coordinate are
concatenated and tiled to d. Queries and keys of the patch tokens are rotated (rotate-half convention);
the prefix tokens (CLS, registers / storage tokens) are not.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Rope(nn.Module):
    """``forward(h, w)`` -> (sin, cos), each [h*w, head_dim], for an h x w patch grid (row-major)."""

    periods: Tensor

    def __init__(self, head_dim: int, base: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head width divisible by 4, got {head_dim}")
        k = torch.arange(head_dim // 4, dtype=torch.float32)
        self.register_buffer("periods", base ** (2 * k / (head_dim // 2)))

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        dev = self.periods.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h * 2 - 1
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # [HW, (y, x)]
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, d/4]
        angles = angles.flatten(1).tile(2)  # [HW, d]: y angles, x angles, repeated
        return angles.sin(), angles.cos()


def rotate_half(x: Tensor) -> Tensor:
    """[..., d] -> [-x2, x1] with x1, x2 the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the patch tokens of x [B, heads, N, d]: the last h*w = len(sin) tokens; the prefix stays."""
    sin, cos = rope
    n_prefix = x.shape[2] - sin.shape[0]
    pre, patches = x[:, :, :n_prefix], x[:, :, n_prefix:]
    patches = patches * cos.to(x.dtype) + rotate_half(patches) * sin.to(x.dtype)
    return torch.cat([pre, patches], dim=2)
