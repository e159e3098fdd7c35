"""KoLeo regulariser (Sablayrolles et al. 2019; DINOv2, METHODS.md section 3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """-mean_i log(||z_i - z_nn(i)|| + eps) over a batch x [B, D], with z = normalize(x), in float32.

    nn(i) is the sample with the largest dot product with z_i, the diagonal excluded. Duplicated rows
    give distance 0 and a finite loss (-log eps); the gradient of the distance at 0 is 0, not NaN.
    Fewer than 2 rows: 0 (no neighbour).
    """
    if x.shape[0] < 2:
        return x.float().sum() * 0.0
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=-1, eps=1e-8)
        with torch.no_grad():
            dots = z @ z.t()
            dots.fill_diagonal_(-float("inf"))
            nn_idx = dots.argmax(dim=1)
        d = torch.linalg.vector_norm(z - z[nn_idx], dim=-1)
        return -torch.log(d + eps).mean()
