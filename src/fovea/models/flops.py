"""Analytic FLOPs of the backbone and heads (multiply-add = 2 FLOPs; matmuls and convolutions only),
used by the methods' ``flops`` (the throughput benchmark's fraction of the matmul rate)."""
from __future__ import annotations

from fovea.models.layers import swiglu_hidden
from fovea.models.vit import ARCHS, ViTConfig


def dims(m: ViTConfig) -> tuple[int, int, int, int]:
    """(embed_dim D, depth, heads, MLP hidden width) of the backbone, resolved from the arch and overrides."""
    d0, depth0, h0, r0 = ARCHS[m.arch]
    d, depth, heads, ratio = m.embed_dim or d0, m.depth or depth0, m.num_heads or h0, m.mlp_ratio or r0
    return d, depth, heads, (swiglu_hidden(d, ratio) if m.ffn == "swiglu" else int(d * ratio))


def block_flops(n: int, d: int, hid: int, swiglu: bool = False) -> int:
    """One pre-norm ViT block on n tokens of width d: qkv, proj, the MLP (fc1, fc2; SwiGLU: w12, w3),
    q k^T and attn v."""
    mlp = 3 * d * hid if swiglu else 2 * d * hid
    return 2 * n * (3 * d * d + d * d + mlp) + 2 * 2 * n * n * d


def backbone_flops(m: ViTConfig, size: int, tokens: int | None = None) -> tuple[int, int]:
    """(patch embedding, blocks) forward FLOPs of one image of ``size`` px; ``tokens`` overrides the number
    of patch tokens the blocks see (a subset, as the I-JEPA context encoder)."""
    d, depth, _, hid = dims(m)
    p = m.patch_size
    n_patches = (size // p) ** 2
    n = int(m.cls_token) + m.num_register_tokens + (n_patches if tokens is None else tokens)
    return 2 * n_patches * (m.in_chans * p * p) * d, depth * block_flops(n, d, hid, m.ffn == "swiglu")


def head_flops(m: ViTConfig, nlayers: int, hidden: int, bottleneck: int, out_dim: int) -> int:
    """DINO head on one token: the MLP (nlayers) and the prototype layer (bottleneck x K)."""
    d = dims(m)[0]
    nl = max(nlayers, 1)
    mlp = 2 * d * bottleneck if nl == 1 else 2 * (d * hidden + (nl - 2) * hidden ** 2 + hidden * bottleneck)
    return mlp + 2 * bottleneck * out_dim
