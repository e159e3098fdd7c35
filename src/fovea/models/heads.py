"""Projection heads: the DINO head (MLP -> L2-normalise -> weight-normalised prototypes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: W = g * v / ||v|| (row-wise).

    Parameters are named ``weight_g`` [K, 1] and ``weight_v`` [K, in] as in the official DINO
    heads. With ``fix_norm`` the gain stays 1 and receives no gradient (``norm_last_layer``).
    """

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    @property
    def weight(self) -> Tensor:
        """Effective weight [K, in]."""
        return self.weight_g * F.normalize(self.weight_v, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP in_dim -> hidden (x nlayers-1, [BatchNorm,] GELU) -> bottleneck, L2-normalise, prototypes K.

    ``l2_norm=False`` skips the L2 normalisation before the prototypes (the released Franca head).
    ``use_bn`` is the official DINO ``use_bn_in_head`` option: BatchNorm removes the component
    common to the batch, so image-specific differences drive the prototypes from the first step.

    ``forward``: input [N, in_dim] -> a list of one level, ``[logits [N, K]]``, like every head of the
    self-distillation methods (:class:`~fovea.models.matryoshka.MatryoshkaHead` returns one per level);
    ``logits`` returns the tensor itself. ``last_layer`` holds the prototypes (frozen during the first
    epoch(s): "freeze last layer").
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False, l2_norm: bool = True) -> None:
        super().__init__()
        self.l2_norm = l2_norm
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            def hidden(d_in: int) -> list[nn.Module]:
                return [nn.Linear(d_in, hidden_dim)] + ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
            layers = hidden(in_dim)
            for _ in range(nlayers - 2):
                layers += hidden(hidden_dim)
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    @property
    def out_dims(self) -> list[int]:
        """Prototypes of each level (one level)."""
        return [self.last_layer.weight_v.shape[0]]

    @property
    def last_layer_modules(self) -> list[nn.Module]:
        """The prototype layer of each level (frozen during 'freeze last layer')."""
        return [self.last_layer]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.logits(x)]

    def logits(self, x: Tensor) -> Tensor:
        """Input [N, in_dim] -> logits [N, K]."""
        z = self.mlp(x)
        if self.l2_norm:
            z = F.normalize(z, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(z)
