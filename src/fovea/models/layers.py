"""The layers of the Vision Transformer: patch embedding, attention (with RoPE and packed sequences),
MLP / SwiGLU, LayerScale, stochastic depth and the pre-norm block; fixed 2-D sin-cos positions.

Parameter names follow the official DINOv2 backbones (see :mod:`fovea.models.vit`).
"""
from __future__ import annotations

from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fovea.models.packing import PackedLayout
from fovea.models.rope import apply_rope

SincosLayout = Literal["col_row", "row_col"]
FFN = Literal["mlp", "swiglu"]
DropPathMode = Literal["plain", "efficient"]
SINCOS_LAYOUTS: tuple[str, ...] = get_args(SincosLayout)
FFNS: tuple[str, ...] = get_args(FFN)
DROP_PATH_MODES: tuple[str, ...] = get_args(DropPathMode)

def sincos_pos_embed_2d(dim: int, h: int, w: int, layout: str = "col_row") -> Tensor:
    """Fixed 2-D sin-cos positional embedding [h*w, dim] in row-major patch order.

    ``col_row`` (the released I-JEPA layout, METHODS.md section 5): the first dim/2 channels encode the
    patch's column, the last dim/2 its row; ``row_col`` swaps the halves (fovea before issue 14). Each
    half is [sin(pos*f), cos(pos*f)] with frequencies f_k = 10000^(-k/(dim/4)), k < dim/4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {dim}")
    if layout not in SINCOS_LAYOUTS:
        raise ValueError(f"sin-cos layout must be one of {SINCOS_LAYOUTS}, got {layout!r}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def enc(pos: Tensor) -> Tensor:
        ang = pos.to(torch.float64)[:, None] * freqs[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    halves = [enc(cols.flatten()), enc(rows.flatten())]
    return torch.cat(halves if layout == "col_row" else halves[::-1], dim=1).float()


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> patch tokens [B, H/p * W/p, D] via a strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        return self.proj(x).flatten(2).transpose(1, 2)


class LayerScale(nn.Module):
    """Per-channel learned scale ``gamma * x`` (Touvron et al.)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention on [B, N, D] using ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, layout: PackedLayout | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, N, D] -> [B, N, D]; or packed tokens x [T, D] with ``layout`` -> [T, D].
        ``rope`` (sin, cos) [Np, head_dim] rotates the queries and keys of the last Np tokens."""
        if layout is not None:
            if rope is not None:
                raise ValueError("RoPE backbones run unpacked (model.packing=unpacked)")
            t, d = x.shape
            q, k, v = self.qkv(x).reshape(t, 3, self.num_heads, d // self.num_heads).unbind(1)
            return self.proj(layout.attention(q, k, v).reshape(t, d))
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def attention_map(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Softmax attention weights [B, heads, N, N] (for pictures; not used in training)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.unbind(0)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return ((q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(-1)


class Mlp(nn.Module):
    """Two-layer GELU MLP D -> hidden -> D."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """SwiGLU FFN D -> (2 x hidden) -> D: ``w3(silu(a) * b)`` with ``a, b = w12(x).chunk(2)`` (DINOv2 names)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """DINOv2's SwiGLU width: 2/3 of the GELU hidden, rounded up to a multiple of 8 (ViT-g: 4096)."""
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Per-sample stochastic depth on a residual branch output [B, ...]; rescales kept samples."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""

    norm1: nn.LayerNorm
    attn: "Attention"
    drop_path_rate: float

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, layerscale_init: float, norm_eps: float,
                 ffn: str = "mlp", drop_path_mode: str = "plain", swiglu_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn not in FFNS:
            raise ValueError(f"model.ffn: unknown {ffn!r}; choose one of {', '.join(FFNS)}")
        if drop_path_mode not in DROP_PATH_MODES:
            raise ValueError(f"model.drop_path_mode: unknown {drop_path_mode!r}; choose one of {', '.join(DROP_PATH_MODES)}")
        self.mlp: nn.Module = (Mlp(dim, int(dim * mlp_ratio)) if ffn == "mlp"
                               else SwiGLUFFN(dim, swiglu_hidden(dim, swiglu_ratio)))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init > 0 else nn.Identity()
        self.drop_path_rate = drop_path_rate
        self.drop_path_mode = drop_path_mode
        self.checkpointing = False  # activation checkpointing (train.activation_checkpointing)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, layout: PackedLayout | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, N, D] (or packed [T, D] with ``layout``) -> same shape; ``rope``: see :class:`Attention`.

        With ``checkpointing`` (training, gradients on) the block's activations are recomputed in the
        backward instead of kept; the random draws of stochastic depth are replayed, so the result and the
        gradients are the same."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            return cast(Tensor, checkpoint(self._forward, x, attn_mask, layout, rope, use_reentrant=False))
        return self._forward(x, attn_mask, layout, rope)

    def _forward(self, x: Tensor, attn_mask: Tensor | None, layout: PackedLayout | None,
                 rope: tuple[Tensor, Tensor] | None) -> Tensor:
        x = self._residual(x, lambda t, lay: self.ls1(self.attn(self.norm1(t), attn_mask, lay, rope)), layout,
                           attn_mask is None)
        return self._residual(x, lambda t, lay: self.ls2(self.mlp(self.norm2(t))), layout, True)

    def _residual(self, x: Tensor, branch, layout: PackedLayout | None, can_subset: bool) -> Tensor:
        """x + branch(x) with stochastic depth (plain: per-sample mask; efficient: branch on a subset)."""
        p = self.drop_path_rate
        if not self.training or p == 0.0:
            return x + branch(x, layout)
        if self.drop_path_mode == "efficient" and can_subset:
            if layout is None:  # samples are rows of x [B, N, D]
                b = x.shape[0]
                kept = max(int(b * (1 - p)), 1)
                idx = torch.randperm(b, device=x.device)[:kept]
                return torch.index_add(x, 0, idx, branch(x[idx], None).to(x.dtype), alpha=b / kept)
            idx, sub, scale = layout.subset(1 - p, x.device)  # samples are packed sequences
            return torch.index_add(x, 0, idx, (branch(x[idx], sub) * scale).to(x.dtype))
        if layout is None:
            return x + drop_path(branch(x, None), p, True)
        return x + branch(x, layout) * layout.sample_keep_mask(1 - p, x.device)
