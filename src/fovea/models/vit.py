"""Vision Transformer backbone (METHODS.md sections 3 and 5).

Token layout: ``[CLS, registers..., patches...]`` (``model.cls_token=false``, as in I-JEPA:
``[registers..., patches...]``). Parameter names follow the official
DINOv2 backbones (``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,
mlp.fc2,ls2.gamma}``, ``norm``; SwiGLU: ``mlp.w12``, ``mlp.w3``) so that released weights load
without renaming. Packed multi-crop forwards live in :mod:`fovea.models.packing`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fovea.models.layers import FFN, SINCOS_LAYOUTS, Block, DropPathMode, PatchEmbed, SincosLayout, sincos_pos_embed_2d, swiglu_hidden
from fovea.models.packing import PackedLayout, resolve_packing
from fovea.models.rope import Rope

__all__ = ["ARCHS", "SINCOS_LAYOUTS", "Block", "Features", "ViTConfig", "VisionTransformer", "sincos_pos_embed_2d", "swiglu_hidden"]

PosEmbed = Literal["learned", "sincos", "rope"]
Packing = Literal["auto", "packed", "unpacked"]
PackedAttention = Literal["segments", "mask", "njt"]
POS_EMBEDS: tuple[str, ...] = get_args(PosEmbed)

# name -> (embed_dim, depth, num_heads, mlp_ratio)
ARCHS: dict[str, tuple[int, int, int, float]] = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1536, 40, 24, 4096 / 1536),
}


@dataclass
class ViTConfig:
    """Backbone hyper-parameters (the ``model`` section of a run config)."""

    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_huge | vit_giant
    patch_size: int = 16  # patch size in px
    img_size: int = 224  # resolution the positional embedding is stored at
    in_chans: int = 3  # input channels
    num_register_tokens: int = 0  # register tokens after CLS (DINOv2 'with registers': 4)
    drop_path_rate: float = 0.1  # stochastic depth rate (linear over depth unless drop_path_uniform)
    drop_path_uniform: bool = False  # same drop-path rate in every block (DINOv2 large configs)
    drop_path_mode: DropPathMode = "plain"  # plain (mask whole samples) | efficient (branch on a (1-p) batch subset, x 1/(1-p))
    ffn: FFN = "mlp"  # mlp (GELU, fc1/fc2) | swiglu (w12/w3, hidden = 2/3 * 4D rounded to 8; 4096 for ViT-g)
    packing: Packing = "auto"  # multi-crop forward: auto (packed on CUDA, unpacked on CPU) | packed | unpacked
    packed_attention: PackedAttention = "segments"  # block-diagonal attention when packed: segments | mask | njt
    layerscale_init: float = 0.0  # 0 = no LayerScale (DINO v1); DINOv2 uses 1e-5
    qkv_bias: bool = True  # bias in the qkv projection
    norm_eps: float = 1e-6  # LayerNorm epsilon
    embed_dim: int | None = field(default=None, metadata={"auto": True})  # null = from arch
    depth: int | None = field(default=None, metadata={"auto": True})  # null = from arch
    num_heads: int | None = field(default=None, metadata={"auto": True})  # null = from arch
    mlp_ratio: float | None = field(default=None, metadata={"auto": True})  # null = from arch
    patch_projection: bool = False  # fixed D x D map on output patch tokens (RASA post-training writes it)
    cls_token: bool = True  # prepend a CLS token (false for I-JEPA: evaluation then uses the mean patch token)
    pos_embed: PosEmbed = "learned"  # learned | sincos (fixed 2-D sin-cos, I-JEPA; stored as a frozen parameter) | rope (DINOv3 axial 2-D rotary, no table)
    rope_base: float = 100.0  # pos_embed=rope: period base (DINOv3: 100)
    sincos_layout: SincosLayout = "col_row"  # pos_embed=sincos: col_row (released I-JEPA: column channels first) | row_col
    interpolate_offset: float = 0.0  # learned positions at another grid: 0 = bicubic to the exact size; > 0 = scale factor (n + offset) / N (DINO v1, DINOv2 without registers: 0.1)
    interpolate_antialias: bool = False  # antialias in that bicubic resize (DINOv2 models with registers: true)





@dataclass
class Features:
    """What :meth:`VisionTransformer.forward_features` returns for a batch of B images.

    ``cls`` [B, D] (None without a CLS token), ``registers`` [B, R, D], ``patches`` [B, Np, D] (all after the
    final norm; ``patches`` also after the optional patch projection), ``prenorm`` [B, C+R+Np, D] (the last
    block's output) and the ``masks`` [B, Np] the input was masked with (or None).
    """

    cls: Tensor | None
    registers: Tensor
    patches: Tensor
    prenorm: Tensor
    masks: Tensor | None

    def split(self, sizes: list[int]) -> list["Features"]:
        """Per-chunk features of a batch made of chunks of ``sizes`` images."""
        def parts(t: Tensor | None) -> list[Tensor | None]:
            return [None] * len(sizes) if t is None else list(t.split(sizes))
        cls, masks = parts(self.cls), parts(self.masks)
        regs, patches, prenorm = self.registers.split(sizes), self.patches.split(sizes), self.prenorm.split(sizes)
        return [Features(cls[i], regs[i], patches[i], prenorm[i], masks[i]) for i in range(len(sizes))]


class VisionTransformer(nn.Module):
    """ViT backbone returning CLS, register and patch tokens.

    ``forward_features(x [B,C,H,W], masks [B, Np] bool | None)`` returns :class:`Features`;
    ``forward`` returns the CLS (the mean patch token without CLS).
    """

    patch_proj: Tensor | None

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {sorted(ARCHS)}")
        d0, depth0, h0, r0 = ARCHS[cfg.arch]
        dim, depth = cfg.embed_dim or d0, cfg.depth or depth0
        heads, ratio = cfg.num_heads or h0, cfg.mlp_ratio or r0
        self.cfg = cfg
        self.embed_dim, self.depth, self.num_heads = dim, depth, heads
        self.patch_size = cfg.patch_size
        self.num_register_tokens = cfg.num_register_tokens
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"model.img_size {cfg.img_size} not divisible by patch_size {cfg.patch_size}")
        grid = cfg.img_size // cfg.patch_size
        if cfg.pos_embed not in POS_EMBEDS:
            raise ValueError(f"model.pos_embed: {cfg.pos_embed!r} not one of {', '.join(POS_EMBEDS)}")
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.n_cls = int(cfg.cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token else None
        # positions of [CLS (if any), patches]; sincos: fixed (CLS slot zero), not trained
        self.pos_embed = (nn.Parameter(torch.zeros(1, self.n_cls + grid * grid, dim),
                                       requires_grad=cfg.pos_embed == "learned") if cfg.pos_embed != "rope" else None)
        self.rope_embed = Rope(dim // heads, cfg.rope_base) if cfg.pos_embed == "rope" else None
        self.register_tokens = (nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
                                if cfg.num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        rates = ([cfg.drop_path_rate] * depth if cfg.drop_path_uniform else  # uniform, or linear over depth
                 [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)])
        self.blocks = nn.ModuleList(
            Block(dim, heads, ratio, cfg.qkv_bias, rates[i], cfg.layerscale_init, cfg.norm_eps,
                  cfg.ffn, cfg.drop_path_mode, cfg.mlp_ratio or 4.0)
            for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        # Optional fixed linear map P [D, D] on the final normalised patch tokens (x -> x @ P.T), e.g. the
        # folded RASA removal. A buffer (saved/exported, never trained); absent by default, so the default
        # state_dict keeps the DINOv2 layout.
        self.register_buffer("patch_proj", torch.eye(dim) if cfg.patch_projection else None)
        self.init_weights()

    def init_weights(self) -> None:
        """Truncated-normal(0.02) for linear layers and embeddings, cls 1e-6 (DINOv2 style)."""
        if self.cfg.pos_embed == "sincos" and self.pos_embed is not None:
            g = int(math.isqrt(self.pos_embed.shape[1] - self.n_cls))
            with torch.no_grad():
                self.pos_embed.zero_()
                self.pos_embed[0, self.n_cls:] = sincos_pos_embed_2d(self.embed_dim, g, g, self.cfg.sincos_layout)
        elif self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h_patches: int, w_patches: int) -> Tensor:
        """Positional embedding [1, C+h*w, D] (C = 1 with CLS, else 0) for an h x w patch grid.

        Learned: bicubic interpolation of the stored N x N table (identity at the stored grid), to the
        exact size, or with ``scale_factor = ((h + offset) / N, (w + offset) / N)`` when
        ``model.interpolate_offset`` > 0 (the DINO v1 / DINOv2 rule), antialiased when
        ``model.interpolate_antialias``; sincos: recomputed for h x w.
        """
        c = self.n_cls
        if self.pos_embed is None:
            raise ValueError("this backbone has no position table (model.pos_embed=rope)")
        g = int(math.isqrt(self.pos_embed.shape[1] - c))
        if h_patches == g and w_patches == g:
            return self.pos_embed
        cls_pos = self.pos_embed[:, :c]
        if self.cfg.pos_embed == "sincos":
            patch_pos = sincos_pos_embed_2d(self.embed_dim, h_patches, w_patches,
                                            self.cfg.sincos_layout).to(self.pos_embed)[None]
            return torch.cat([cls_pos, patch_pos], dim=1)
        patch_pos = self.pos_embed[:, c:]
        patch_pos = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        off = self.cfg.interpolate_offset
        size = {"scale_factor": ((h_patches + off) / g, (w_patches + off) / g)} if off else {"size": (h_patches, w_patches)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", align_corners=False,
                                  antialias=self.cfg.interpolate_antialias, **size)
        if patch_pos.shape[-2:] != (h_patches, w_patches):
            raise ValueError(f"position interpolation gave a {tuple(patch_pos.shape[-2:])} grid for "
                             f"{h_patches} x {w_patches} patches (model.interpolate_offset={off})")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
        return torch.cat([cls_pos, patch_pos.to(cls_pos.dtype)], dim=1)

    @property
    def block_list(self) -> list[Block]:
        """The blocks, typed (``self.blocks`` is an ``nn.ModuleList``)."""
        return cast(list[Block], list(self.blocks))

    @property
    def n_prefix(self) -> int:
        """Number of tokens before the patches (CLS + registers)."""
        return self.n_cls + self.num_register_tokens

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Image [B,C,H,W] (+ bool masks [B,Np]) -> tokens [B, C+R+Np, D] (C = 1 with CLS, else 0).

        Masked patches are replaced by the mask token BEFORE positions are added;
        register tokens are inserted after the positional embedding. ``keep`` [B, K] (patch
        indices) keeps only those patches, after positions are added (I-JEPA context encoder):
        the result is then [B, C+R+K, D].
        """
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        if self.pos_embed is not None:  # RoPE backbones rotate q and k inside attention instead
            tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size)
        c = self.n_cls
        if keep is not None:
            if self.rope_embed is not None:
                raise ValueError("RoPE backbones do not support keep= (subsets of patches) yet")
            patches = tokens[:, c:].gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
            tokens = torch.cat([tokens[:, :c], patches], dim=1)
        if self.register_tokens is not None:
            tokens = torch.cat([tokens[:, :c], self.register_tokens.expand(b, -1, -1), tokens[:, c:]], dim=1)
        return tokens

    def forward_features(self, x: Tensor, masks: Tensor | None = None, keep: Tensor | None = None,
                         keep_valid: Tensor | None = None) -> Features:
        """See :class:`Features` for the shapes.

        ``keep`` [B, K] long: encode only these patches (``patches`` is then [B, K, D]);
        ``keep_valid`` [B, K] bool marks padding (False) that no token attends to.
        """
        t = self.prepare_tokens(x, masks, keep)
        attn_mask = None
        if keep_valid is not None:
            valid = torch.cat([keep_valid.new_ones(t.shape[0], self.n_prefix), keep_valid], dim=1)
            attn_mask = valid[:, None, None, :]  # [B, 1, 1, N]: True = may be attended to
        rope = self.rope_for(x)
        for blk in self.blocks:
            t = blk(t, attn_mask, rope=rope)
        return self._split(t, masks)

    def rope_for(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """RoPE (sin, cos) [Np, head_dim] for images x [B, C, H, W] (None without RoPE); pass it to every
        block call as ``blk(t, rope=...)``."""
        if self.rope_embed is None:
            return None
        return self.rope_embed(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

    def project_patches(self, patches: Tensor) -> Tensor:
        """Apply the optional patch projection: [..., D] -> [..., D] (``patches @ patch_proj.T``)."""
        if self.patch_proj is None:
            return patches
        return patches @ self.patch_proj.to(patches.dtype).T

    def _split(self, t: Tensor, masks: Tensor | None) -> Features:
        tn = self.norm(t)
        c, r = self.n_cls, self.num_register_tokens
        return Features(cls=tn[:, 0] if c else None, registers=tn[:, c:c + r],
                        patches=self.project_patches(tn[:, c + r:]), prenorm=t, masks=masks)

    def forward_features_list(self, xs: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None
                              ) -> list[Features]:
        """Multi-crop forward: crops with equal resolution are concatenated and run together.

        ``xs`` is a list of [B_i, C, H_i, W_i] crops; returns one :class:`Features` per crop, in order.
        With ``model.packing`` packed (see :func:`fovea.models.packing.resolve_packing`), all groups go
        through the blocks as one packed sequence with block-diagonal attention instead.
        """
        masks = list(masks) if masks is not None else [None] * len(xs)
        if self.rope_embed is None and resolve_packing(self.cfg.packing, xs[0].device):
            return self.forward_features_packed(xs, masks)
        outs: dict[int, Features] = {}
        for idx, x, m in self._resolution_groups(xs, masks):
            out = self.forward_features(x, m)
            outs.update(zip(idx, out.split([xs[i].shape[0] for i in idx])))
        return [outs[i] for i in range(len(xs))]

    def forward_features_packed(self, xs: Sequence[Tensor], masks: Sequence[Tensor | None]
                                ) -> list[Features]:
        """Same outputs as the unpacked forward; all crops share every block call (packed tokens [T, D])."""
        outs: dict[int, Features] = {}
        toks, shapes, groups = [], [], []
        for idx, x, m in self._resolution_groups(xs, masks):
            t = self.prepare_tokens(x, m)
            toks.append(t.reshape(-1, t.shape[-1]))
            shapes.append((t.shape[0], t.shape[1], m))
            groups.append(idx)
        layout = PackedLayout(tuple((b, n) for b, n, _ in shapes), self.cfg.packed_attention)
        t = torch.cat(toks)
        for blk in self.blocks:
            t = blk(t, layout=layout)
        for (b, n, m), chunk, idx in zip(shapes, t.split([b * n for b, n, _ in shapes]), groups):
            out = self._split(chunk.reshape(b, n, -1), m)
            outs.update(zip(idx, out.split([xs[i].shape[0] for i in idx])))
        return [outs[i] for i in range(len(xs))]

    def _resolution_groups(self, xs: Sequence[Tensor], masks: Sequence[Tensor | None]
                           ) -> list[tuple[list[int], Tensor, Tensor | None]]:
        """Crops of equal resolution concatenated: (crop indices, images [sum B_i, C, H, W], masks or None)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, x in enumerate(xs):
            groups.setdefault((x.shape[-2], x.shape[-1]), []).append(i)
        res = []
        for idx in groups.values():
            x = torch.cat([xs[i] for i in idx])
            ms = [masks[i] for i in idx]
            n_patches = x.shape[-2] * x.shape[-1] // self.patch_size ** 2
            m = None if all(v is None for v in ms) else torch.cat(
                [v if v is not None else torch.zeros(xs[i].shape[0], n_patches, dtype=torch.bool, device=x.device)
                 for i, v in zip(idx, ms)])
            res.append((idx, x, m))
        return res

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True
                                ) -> tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]:
        """Outputs of the last ``n`` blocks (or of the block indices in ``n``).

        Each output is patch tokens [B, Np, D] (or [B, D, h, w] with ``reshape``), paired with
        the CLS token [B, D] when ``return_class_token``. Register tokens are dropped. The patch
        projection (if any) applies to the normalised output of the last block only, where it
        equals ``forward_features(x).patches``.
        """
        if return_class_token and self.cls_token is None:
            raise ValueError("this backbone has no CLS token (model.cls_token=false); use the mean patch token")
        take = set(range(self.depth - n, self.depth)) if isinstance(n, int) else set(n)
        t = self.prepare_tokens(x)
        rope = self.rope_for(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = blk(t, rope=rope)
            if i in take:
                outs.append(t)
        if norm:
            outs = [self.norm(o) for o in outs]
        cls = [o[:, 0] for o in outs]
        last = len(outs) - 1 if norm and self.depth - 1 in take else -1  # blocks run in order: last block last
        np_ = self.n_prefix
        patches = [self.project_patches(o[:, np_:]) if i == last else o[:, np_:] for i, o in enumerate(outs)]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, cls))
        return tuple(patches)

    def forward(self, x: Tensor) -> Tensor:
        """CLS embedding [B, D] (mean patch token when the backbone has no CLS)."""
        out = self.forward_features(x)
        return out.patches.mean(1) if out.cls is None else out.cls


def build_vit(cfg: ViTConfig) -> VisionTransformer:
    """Construct a backbone from its config."""
    return VisionTransformer(cfg)
