"""I-JEPA predictor (METHODS.md section 5): a narrow ViT from context tokens to target predictions.

Context tokens [B, Nc, D] are projected to the predictor width Dp and given the predictor's
fixed 2-D sin-cos position of their patch; each target block contributes one token per target
patch: a shared learned mask token plus that patch's position. The transformer runs on
``[context, targets]`` (once per target block, blocks stacked along the batch), and the
target tokens are normalised and projected back to D.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from fovea.models.layers import Block, sincos_pos_embed_2d


class Predictor(nn.Module):
    """``forward(ctx [B,Nc,D], ctx_idx [B,Nc], ctx_valid [B,Nc], tgt_idx [B,M,Nt], tgt_valid [B,M,Nt])``
    -> predictions [B*M, Nt, D] (row ``b*M + m`` is image b's target block m)."""

    predictor_pos_embed: Tensor

    def __init__(self, embed_dim: int, grid_h: int, grid_w: int, pred_dim: int = 384, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, sincos_layout: str = "col_row") -> None:
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_dim))
        self.register_buffer("predictor_pos_embed", sincos_pos_embed_2d(pred_dim, grid_h, grid_w, sincos_layout)[None],
                             persistent=False)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.predictor_blocks = nn.ModuleList(
            Block(pred_dim, num_heads, mlp_ratio, True, rates[i], 0.0, norm_eps) for i in range(depth))
        self.predictor_norm = nn.LayerNorm(pred_dim, eps=norm_eps)
        self.predictor_proj = nn.Linear(pred_dim, embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pos(self, idx: Tensor) -> Tensor:
        """Patch indices [B, N] -> positions [B, N, Dp]."""
        pos = self.predictor_pos_embed[0]
        return pos[idx]

    def forward(self, ctx: Tensor, ctx_idx: Tensor, ctx_valid: Tensor, tgt_idx: Tensor, tgt_valid: Tensor) -> Tensor:
        b, m, nt = tgt_idx.shape
        nc = ctx.shape[1]
        z = self.predictor_embed(ctx) + self._pos(ctx_idx).to(ctx.dtype)  # [B, Nc, Dp]
        z = z.repeat_interleave(m, dim=0)  # [B*M, Nc, Dp]
        t_idx = tgt_idx.reshape(b * m, nt)
        q = self.mask_token.to(z.dtype) + self._pos(t_idx).to(z.dtype)  # [B*M, Nt, Dp]
        x = torch.cat([z, q], dim=1)
        valid = torch.cat([ctx_valid.repeat_interleave(m, dim=0), tgt_valid.reshape(b * m, nt)], dim=1)
        attn_mask = valid[:, None, None, :]  # padding takes no part as a key
        for blk in self.predictor_blocks:
            x = blk(x, attn_mask)
        return self.predictor_proj(self.predictor_norm(x[:, nc:]))
