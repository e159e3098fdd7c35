"""Packed multi-crop sequences with block-diagonal attention (METHODS.md section 3, "sequence packing").

All crops of a step (2 global crops of N_g tokens and L local crops of N_l tokens, per image) are laid
out as ONE flat token tensor ``[T, D]``. Per-token work (norms, qkv, projection, MLP) runs as one
matmul over all T tokens; attention is block-diagonal: a token only attends to tokens of its own crop.

The layout is a list of groups ``(n_seq, seq_len)``: ``n_seq`` sequences of equal length, stored one
after another, each group after the previous one. Three implementations of the block-diagonal
attention, all with PyTorch's own ``scaled_dot_product_attention`` (no xFormers):

- ``segments``: each group is viewed as ``[n_seq, heads, seq_len, hd]`` and attended separately
  (no wasted work: exactly the blocks of the block-diagonal matrix);
- ``mask``: one SDPA call over ``[1, heads, T, hd]`` with a boolean ``[T, T]`` block-diagonal mask
  (O(T^2) memory and work; a reference, and what a FlashAttention varlen kernel would replace);
- ``njt``: a nested jagged tensor built from the flat tokens and the sequence offsets.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PackedLayout:
    """Groups ``(n_seq, seq_len)`` of a flat token tensor; ``impl`` selects the attention kernel."""

    groups: tuple[tuple[int, int], ...]
    impl: str = "segments"

    @property
    def n_tokens(self) -> int:
        return sum(n * s for n, s in self.groups)

    def seq_lengths(self) -> list[int]:
        """Length of every sequence, in storage order."""
        return [s for n, s in self.groups for _ in range(n)]

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Block-diagonal attention. q, k, v: [T, H, hd] -> [T, H, hd]."""
        if self.impl == "segments":
            outs, start = [], 0
            for n, s in self.groups:
                sl = slice(start, start + n * s)
                qg, kg, vg = (t[sl].reshape(n, s, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(qg, kg, vg).transpose(1, 2).reshape(n * s, *q.shape[1:]))
                start += n * s
            return torch.cat(outs) if len(outs) > 1 else outs[0]
        if self.impl == "mask":
            lens = torch.tensor(self.seq_lengths(), device=q.device)
            seg = torch.repeat_interleave(torch.arange(len(lens), device=q.device), lens)
            mask = seg[:, None] == seg[None, :]
            qm, km, vm = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, hd]
            return F.scaled_dot_product_attention(qm, km, vm, attn_mask=mask)[0].transpose(0, 1)
        if self.impl == "njt":
            lens = torch.tensor(self.seq_lengths(), device=q.device)
            offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
            qn, kn, vn = (torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2)
                          for t in (q, k, v))
            return F.scaled_dot_product_attention(qn, kn, vn).transpose(1, 2).values()
        raise ValueError(f"model.packed_attention: unknown {self.impl!r}; choose segments, mask or njt")

    def subset(self, keep: float, device: torch.device) -> tuple[Tensor, "PackedLayout", Tensor]:
        """Random subset of sequences for efficient stochastic depth.

        In each group, ``max(int(n * keep), 1)`` sequences are kept (uniformly at random, torch's global
        RNG). Returns (token indices [T_sub], layout of the subset, per-token scale n / n_kept [T_sub, 1]).
        """
        idx, groups, scales, start = [], [], [], 0
        for n, s in self.groups:
            kept = max(int(n * keep), 1)
            seqs = torch.randperm(n, device=device)[:kept]
            idx.append((start + seqs[:, None] * s + torch.arange(s, device=device)).reshape(-1))
            scales.append(torch.full((kept * s, 1), n / kept, device=device))
            groups.append((kept, s))
            start += n * s
        return torch.cat(idx), PackedLayout(tuple(groups), self.impl), torch.cat(scales)

    def sample_keep_mask(self, keep: float, device: torch.device) -> Tensor:
        """Ordinary stochastic depth: per-sequence Bernoulli(keep) / keep, expanded to tokens [T, 1]."""
        lens = torch.tensor(self.seq_lengths(), device=device)
        m = torch.empty(len(lens), device=device).bernoulli_(keep) / keep
        return torch.repeat_interleave(m, lens).unsqueeze(-1)


def resolve_packing(mode: str, device: torch.device) -> bool:
    """``packed`` / ``unpacked`` / ``auto`` -> whether the multi-crop forward packs its crops.

    ``auto``: packed on CUDA (one kernel launch per layer for all crops, the reason DINOv2 packs;
    chosen from reasoning, not measured here), unpacked on CPU where the measured step times of
    benchmarks/packing_droppath.py showed no gain from packing (see benchmarks/README.md).
    """
    if mode == "auto":
        return device.type == "cuda"
    if mode not in ("packed", "unpacked"):
        raise ValueError(f"model.packing: unknown {mode!r}; choose auto, packed or unpacked")
    return mode == "packed"
