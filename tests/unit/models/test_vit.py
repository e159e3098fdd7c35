"""Vision Transformer backbone: parameter layout, positional embedding, tokens, multi-crop, drop-path."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fovea.models.layers import drop_path
from fovea.models.vit import ARCHS, ViTConfig, VisionTransformer

D, P, IMG = 48, 4, 16
GRID = IMG // P


def tiny(**kw) -> VisionTransformer:
    cfg = dict(arch="vit_tiny", depth=2, embed_dim=D, num_heads=3, patch_size=P, img_size=IMG, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**cfg))


def randomise(model: VisionTransformer, seed: int = 1) -> VisionTransformer:
    """Give zero-initialised tokens (mask token, biases) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1 or p.shape[0] == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# --------------------------------------------------------------------------- parameter layout

def _expected_keys(depth: int, layerscale: bool, registers: bool) -> set[str]:
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    if registers:
        keys.add("register_tokens")
    for i in range(depth):
        for name in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                     "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                     "mlp.fc2.weight", "mlp.fc2.bias"):
            keys.add(f"blocks.{i}.{name}")
        if layerscale:
            keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


@pytest.mark.parametrize("layerscale,regs", [(0.0, 0), (1e-5, 2)])
def test_state_dict_keys_follow_dinov2_layout(layerscale, regs):
    m = tiny(layerscale_init=layerscale, num_register_tokens=regs)
    sd = m.state_dict()
    assert set(sd) == _expected_keys(2, layerscale > 0, regs > 0)
    assert tuple(sd["pos_embed"].shape) == (1, 1 + GRID * GRID, D)
    assert tuple(sd["cls_token"].shape) == (1, 1, D)
    assert tuple(sd["mask_token"].shape) == (1, D)
    assert tuple(sd["patch_embed.proj.weight"].shape) == (D, 3, P, P)
    assert tuple(sd["blocks.1.attn.qkv.weight"].shape) == (3 * D, D)
    assert tuple(sd["blocks.1.attn.proj.weight"].shape) == (D, D)
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (4 * D, D)
    assert tuple(sd["blocks.0.mlp.fc2.weight"].shape) == (D, 4 * D)
    if regs:
        assert tuple(sd["register_tokens"].shape) == (1, regs, D)
    if layerscale:
        assert tuple(sd["blocks.0.ls1.gamma"].shape) == (D,)
        assert torch.all(sd["blocks.0.ls2.gamma"] == torch.tensor(1e-5, dtype=torch.float32))


def test_pos_embed_shape_other_grid():
    m = VisionTransformer(ViTConfig(arch="vit_tiny", depth=1, embed_dim=24, num_heads=2, patch_size=7, img_size=28))
    assert tuple(m.pos_embed.shape) == (1, 1 + 16, 24)


PUBLISHED = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16),
             "vit_giant": (1536, 40, 24), "vit_tiny": (192, 12, 3)}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_arch_table_matches_published_sizes(arch):
    width, depth, heads = PUBLISHED[arch]
    assert ARCHS[arch][:3] == (width, depth, heads)
    # Resolution of the table by the constructor, without allocating real memory.
    with torch.device("meta"):
        m = VisionTransformer(ViTConfig(arch=arch))
    assert (m.embed_dim, m.depth, m.num_heads) == (width, depth, heads)
    assert len(m.blocks) == depth
    assert tuple(m.blocks[0].attn.qkv.weight.shape) == (3 * width, width)
    hidden = 4096 if arch == "vit_giant" else 4 * width
    assert tuple(m.blocks[0].mlp.fc1.weight.shape) == (hidden, width)


def test_unknown_arch_raises():
    with pytest.raises(ValueError):
        VisionTransformer(ViTConfig(arch="vit_huge_typo"))


# --------------------------------------------------------------------------- positional embedding

def test_interpolate_identity_at_training_grid():
    m = tiny()
    pe = m.interpolate_pos_encoding(GRID, GRID)
    assert pe.shape == m.pos_embed.shape
    assert torch.equal(pe, m.pos_embed)


@pytest.mark.parametrize("h,w", [(6, 6), (2, 3), (7, 5)])
def test_interpolate_other_grid_shape_and_cls(h, w):
    m = tiny()
    pe = m.interpolate_pos_encoding(h, w)
    assert tuple(pe.shape) == (1, 1 + h * w, D)
    assert torch.equal(pe[0, 0], m.pos_embed[0, 0].detach())


def test_interpolate_constant_stays_constant():
    m = tiny()
    const = torch.linspace(-1, 1, D)
    with torch.no_grad():
        m.pos_embed[0, 1:] = const
        m.pos_embed[0, 0] = 5.0
    pe = m.interpolate_pos_encoding(7, 3)[0]
    assert torch.allclose(pe[1:], const.expand(21, D), atol=1e-5)
    assert torch.all(pe[0] == 5.0)


def test_interpolate_ramp_along_x_stays_monotone():
    m = tiny()
    with torch.no_grad():
        for r in range(GRID):
            for c in range(GRID):
                m.pos_embed[0, 1 + r * GRID + c] = float(c)  # ramp along x (column index)
    for h, w in [(7, 9), (3, 11), (8, 2)]:
        pe = m.interpolate_pos_encoding(h, w)[0, 1:, 0].reshape(h, w)
        assert torch.all(pe[:, 1:] - pe[:, :-1] >= -1e-6)   # non-decreasing along x
        assert pe[0, -1] - pe[0, 0] > 1.0                     # actually increases
        assert torch.allclose(pe, pe[:1].expand(h, w), atol=1e-5)  # constant along y


# --------------------------------------------------------------------------- forward shapes

def test_forward_features_shapes_with_registers():
    m = tiny(num_register_tokens=3).eval()
    out = m.forward_features(torch.randn(2, 3, IMG, IMG))
    assert tuple(out.cls.shape) == (2, D)
    assert tuple(out.registers.shape) == (2, 3, D)
    assert tuple(out.patches.shape) == (2, GRID * GRID, D)
    assert tuple(out.prenorm.shape) == (2, 1 + 3 + GRID * GRID, D)
    assert out.masks is None
    assert torch.equal(m(torch.zeros(1, 3, IMG, IMG)), m.forward_features(torch.zeros(1, 3, IMG, IMG)).cls)


def test_forward_non_square_input():
    m = tiny(num_register_tokens=1).eval()
    out = m.forward_features(torch.randn(2, 3, 16, 8))
    assert tuple(out.patches.shape) == (2, 4 * 2, D)
    out = m.forward_features(torch.randn(1, 3, 12, 20))
    assert tuple(out.patches.shape) == (1, 3 * 5, D)


@pytest.mark.parametrize("hw", [(15, 16), (16, 18), (10, 10)])
def test_forward_not_divisible_raises(hw):
    m = tiny()
    with pytest.raises(ValueError):
        m.forward_features(torch.randn(1, 3, *hw))


# --------------------------------------------------------------------------- tokens / mask token

def _patch_embed_by_hand(m: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding through explicit patch extraction (row-major patch order) and a matmul."""
    b, c, h, w = x.shape
    wt = m.patch_embed.proj.weight.detach().reshape(D, -1)
    bias = m.patch_embed.proj.bias.detach()
    rows = []
    for i in range(h // P):
        for j in range(w // P):
            patch = x[:, :, i * P:(i + 1) * P, j * P:(j + 1) * P].reshape(b, -1)
            rows.append(patch @ wt.T + bias)
    return torch.stack(rows, dim=1)


def test_prepare_tokens_mask_token_and_positions():
    m = randomise(tiny(num_register_tokens=2)).eval()
    x = torch.randn(2, 3, IMG, IMG)
    masks = torch.zeros(2, GRID * GRID, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    masks[1, [3]] = True
    with torch.no_grad():
        t = m.prepare_tokens(x, masks)
        pe = _patch_embed_by_hand(m, x)
    pos = m.pos_embed.detach()[0]
    assert tuple(t.shape) == (2, 1 + 2 + 16, D)
    for b in range(2):
        assert torch.allclose(t[b, 0], m.cls_token.detach()[0, 0] + pos[0], atol=1e-6)
        assert torch.equal(t[b, 1:3], m.register_tokens.detach()[0])  # registers: no position added
        for k in range(GRID * GRID):
            tok = t[b, 3 + k]
            if masks[b, k]:
                expected = m.mask_token.detach()[0] + pos[1 + k]
            else:
                expected = pe[b, k] + pos[1 + k]
            assert torch.allclose(tok, expected, atol=1e-5), (b, k, bool(masks[b, k]))


def test_all_false_mask_equals_no_mask():
    m = randomise(tiny()).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        a = m.forward_features(x, torch.zeros(2, GRID * GRID, dtype=torch.bool)).patches
        b = m.forward_features(x).patches
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- multi-crop forward

def test_forward_features_list_equals_separate_forward():
    m = randomise(tiny(num_register_tokens=1, drop_path_rate=0.3)).eval()
    torch.manual_seed(3)
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [1, 2, 9]] = True
    masks = [mask, None, None, None]
    with torch.no_grad():
        outs = m.forward_features_list(crops, masks)
        refs = [m.forward_features(x, mk) for x, mk in zip(crops, masks)]
    assert len(outs) == 4
    for o, r in zip(outs, refs):
        for key in ("cls", "registers", "patches", "prenorm"):
            assert getattr(o, key).shape == getattr(r, key).shape
            assert torch.allclose(getattr(o, key), getattr(r, key), atol=1e-5), key
    assert torch.equal(outs[0].masks, mask)
    # The mask really changes the output of the masked crop.
    with torch.no_grad():
        unmasked = m.forward_features(crops[0]).cls
    assert not torch.allclose(unmasked, outs[0].cls, atol=1e-4)


# --------------------------------------------------------------------------- intermediate layers

def test_get_intermediate_layers():
    m = randomise(tiny(num_register_tokens=2, depth=3)).eval()
    x = torch.randn(2, 3, IMG, 8)
    with torch.no_grad():
        ff = m.forward_features(x)
        (last,) = m.get_intermediate_layers(x, n=1)
        two = m.get_intermediate_layers(x, n=2)
        # reference: run blocks by hand and normalise the output of block index 1
        t = m.prepare_tokens(x)
        per_block = []
        for blk in m.blocks:
            t = blk(t)
            per_block.append(t)
        ref_mid = F.layer_norm(per_block[1], (D,), m.norm.weight, m.norm.bias, eps=1e-6)[:, 3:]
        shaped = m.get_intermediate_layers(x, n=1, reshape=True)
        pairs = m.get_intermediate_layers(x, n=[0, 2], return_class_token=True)
        raw = m.get_intermediate_layers(x, n=1, norm=False)
    assert torch.allclose(last, ff.patches, atol=1e-6)
    assert len(two) == 2
    assert torch.allclose(two[0], ref_mid, atol=1e-5)
    assert torch.allclose(two[1], ff.patches, atol=1e-6)
    assert torch.allclose(raw[0], per_block[-1][:, 3:], atol=1e-6)
    (img,) = shaped
    h, w = IMG // P, 8 // P
    assert tuple(img.shape) == (2, D, h, w)
    for i in range(h):
        for j in range(w):
            assert torch.allclose(img[:, :, i, j], last[:, i * w + j], atol=1e-6)
    assert len(pairs) == 2
    (p0, c0), (p2, c2) = pairs
    assert tuple(p0.shape) == (2, h * w, D) and tuple(c0.shape) == (2, D)
    assert torch.allclose(c2, ff.cls, atol=1e-6)
    assert torch.allclose(p2, ff.patches, atol=1e-6)


# --------------------------------------------------------------------------- drop path

def test_drop_path_eval_is_identity():
    x = torch.randn(8, 5, 4)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)
    m = randomise(tiny(drop_path_rate=0.9)).eval()
    ref = tiny(drop_path_rate=0.0)
    ref.load_state_dict(m.state_dict())
    ref.eval()
    xi = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(m(xi), ref(xi))
        assert torch.equal(m(xi), m(xi))


def test_drop_path_train_preserves_expectation():
    torch.manual_seed(0)
    n = 20000
    x = torch.full((n, 3, 2), 1.5)
    y = drop_path(x, 0.5, training=True)
    flat = y.reshape(n, -1)
    zero = (flat == 0).all(1)
    kept = (flat == 3.0).all(1)  # kept samples are rescaled by 1 / (1 - p)
    assert bool((zero | kept).all())  # per-sample decision: a row is all dropped or all kept
    frac = zero.float().mean().item()
    assert abs(frac - 0.5) < 0.02
    assert abs(y.mean().item() - 1.5) < 0.05
    # p = 0.25: kept rows scaled by 4/3, expectation preserved
    y = drop_path(torch.ones(n, 4), 0.25, training=True)
    assert abs((y[:, 0] == 0).float().mean().item() - 0.25) < 0.02
    assert torch.allclose(y[y[:, 0] != 0], torch.full_like(y[y[:, 0] != 0], 1 / 0.75))
    assert abs(y.mean().item() - 1.0) < 0.03


def test_drop_path_rates_linear_over_depth():
    m = tiny(depth=5, drop_path_rate=0.4)
    rates = [blk.drop_path_rate for blk in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert math.isclose(rates[-1], 0.4)
