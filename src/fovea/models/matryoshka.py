"""Nested Matryoshka projection heads (Franca, METHODS.md section 4).

One DINO-style head per nesting width ``d_m``: its own input map, MLP and weight-normalised prototypes
with ``K * d_m / D`` prototypes. By default level m sees the nested slice ``x[..., :d_m]`` of the
backbone token, so the backbone's leading coordinates themselves become a usable truncated feature;
``input_mode="linear"`` uses a learned ``Linear(D, d_m)`` per level instead (the released code).
"""
from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from fovea.models.heads import DINOHead


def nesting_widths(embed_dim: int, widths: list[int] | None = None, levels: int = 5) -> list[int]:
    """Sorted nesting widths: ``widths`` as given (each in (0, D]) or ``D/2^(levels-1) ... D/2, D``.

    >>> nesting_widths(768)
    [48, 96, 192, 384, 768]
    """
    if widths:
        out = sorted({int(w) for w in widths})
        if out[0] <= 0 or out[-1] > embed_dim:
            raise ValueError(f"matryoshka widths must lie in (0, {embed_dim}], got {widths}")
        return out
    out = sorted({max(embed_dim >> i, 1) for i in range(levels)})
    return out


def level_prototypes(out_dim: int, widths: list[int], embed_dim: int) -> list[int]:
    """Prototypes per level: ``K * d_m / D`` (at least 1), e.g. K=131072, D=768: 8192 ... 131072."""
    return [max(out_dim * d // embed_dim, 1) for d in widths]


class MatryoshkaHead(nn.Module):
    """Nested heads. Input [N, D] -> list of per-level logits ``[N, K_m]`` (narrowest level first).

    ``levels[m]`` is a :class:`DINOHead` (in_dim ``d_m``, MLP ``hidden_dim``/``bottleneck_dim``, ``K_m``
    prototypes); ``proj[m]`` is ``Linear(D, d_m)`` in ``linear`` input mode, absent in ``slice`` mode.
    """

    def __init__(self, embed_dim: int, out_dim: int, widths: list[int], hidden_dim: int = 2048,
                 bottleneck_dim: int = 384, nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False,
                 l2_norm: bool = True, input_mode: str = "slice") -> None:
        super().__init__()
        if input_mode not in ("slice", "linear"):
            raise ValueError(f"matryoshka input mode must be slice or linear, got {input_mode!r}")
        self.embed_dim, self.widths, self.input_mode = embed_dim, list(widths), input_mode
        self.out_dims = level_prototypes(out_dim, self.widths, embed_dim)
        self.levels = nn.ModuleList(DINOHead(d, k, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, use_bn,
                                             l2_norm) for d, k in zip(self.widths, self.out_dims))
        self.proj = nn.ModuleList(nn.Linear(embed_dim, d) for d in self.widths) if input_mode == "linear" else None

    @property
    def heads(self) -> list[DINOHead]:
        """The level heads, typed (``self.levels`` is an ``nn.ModuleList``)."""
        return cast(list[DINOHead], list(self.levels))

    @property
    def last_layer_modules(self) -> list[nn.Module]:
        """Prototype layers of every level (frozen together during 'freeze last layer')."""
        return [h.last_layer for h in self.heads]

    def level_input(self, x: Tensor, m: int) -> Tensor:
        """Input of level m: ``x[..., :d_m]`` (slice) or ``proj[m](x)`` (linear), [N, d_m]."""
        return self.proj[m](x) if self.proj is not None else x[..., :self.widths[m]]

    def forward(self, x: Tensor) -> list[Tensor]:
        return [head.logits(self.level_input(x, m)) for m, head in enumerate(self.heads)]
