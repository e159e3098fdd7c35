"""I-JEPA model parts: ViT options (no CLS, sin-cos positions), predictor, loss, method, schedules."""
from __future__ import annotations

import math

import pytest
import torch

from fovea.config.loader import load_config
from fovea.data.single_view import MaskCollate
from fovea.eval.features import available_kinds
from fovea.losses.jepa import jepa_loss, jepa_targets
from fovea.masking.multiblock import MultiBlockSampler
from fovea.methods.base import StepValues
from fovea.methods.ijepa import IJEPA, gather_targets
from fovea.methods.registry import spec_for
from fovea.models.predictor import Predictor
from fovea.models.vit import ViTConfig, VisionTransformer, sincos_pos_embed_2d

TINY = ["method=ijepa", "model.arch=vit_tiny", "model.depth=2", "model.embed_dim=48", "model.num_heads=3",
        "model.patch_size=4", "model.img_size=32", "model.cls_token=false", "model.pos_embed=sincos",
        "model.drop_path_rate=0.0", "crops.global_size=32", "ijepa.pred_dim=24", "ijepa.pred_depth=2"]
SV = StepValues(step=0, epoch=0.0, lr=1e-3, weight_decay=0.04, sched={"momentum": 0.99})


def tiny_vit(**kw) -> VisionTransformer:
    cfg = dict(arch="vit_tiny", depth=2, embed_dim=48, num_heads=3, patch_size=4, img_size=16, drop_path_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**cfg))


def batch(n: int = 4, equalize: str = "pad") -> dict:
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8), 10 + i, 0) for i in range(n)]
    return MaskCollate(MultiBlockSampler(8, 8), equalize)(items)


# --------------------------------------------------------------------------- ViT options

def test_sincos_hand_values() -> None:
    pe = sincos_pos_embed_2d(8, 2, 3)  # dim 8, released layout: columns use channels 0-3, rows 4-7; freqs 1, 1/100
    assert pe.shape == (6, 8)
    r, c = 1, 2  # patch (1, 2) = index 5
    col = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100)]
    row = [math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
    assert pe[5].tolist() == pytest.approx(col + row, abs=1e-6)
    assert sincos_pos_embed_2d(8, 2, 3, "row_col")[5].tolist() == pytest.approx(row + col, abs=1e-6)
    assert pe[0].tolist() == pytest.approx([0, 0, 1, 1, 0, 0, 1, 1])


def test_no_cls_sincos_layout_and_frozen_positions() -> None:
    m = tiny_vit(cls_token=False, pos_embed="sincos")
    keys = set(m.state_dict())
    assert "cls_token" not in keys and "pos_embed" in keys and "mask_token" in keys
    assert m.pos_embed.shape == (1, 16, 48) and not m.pos_embed.requires_grad
    assert torch.allclose(m.pos_embed[0], sincos_pos_embed_2d(48, 4, 4))
    x = torch.randn(2, 3, 16, 16)
    out = m.forward_features(x)
    assert out.cls is None and out.patches.shape == (2, 16, 48)
    # another resolution: sin-cos recomputed for the 6x6 grid rather than interpolated
    pe = m.interpolate_pos_encoding(6, 6)
    assert torch.allclose(pe[0], sincos_pos_embed_2d(48, 6, 6))
    lay = m.get_intermediate_layers(x, n=2)
    assert len(lay) == 2 and lay[-1].shape == (2, 16, 48)
    assert torch.allclose(lay[-1], out.patches, atol=1e-6)  # last block, normed = forward_features
    with pytest.raises(ValueError, match="CLS"):
        m.get_intermediate_layers(torch.randn(1, 3, 16, 16), return_class_token=True)
    # learned + CLS default unchanged
    d = tiny_vit()
    assert d.pos_embed.shape == (1, 17, 48) and d.pos_embed.requires_grad and "cls_token" in d.state_dict()


def test_no_cls_eval_uses_mean_patch() -> None:
    m = tiny_vit(cls_token=False, pos_embed="sincos").eval()
    assert available_kinds(m, ["cls", "both", "mean_patch"]) == ["mean_patch"]
    assert available_kinds(tiny_vit(), ["cls", "both"]) == ["cls", "both"]
    x = torch.randn(2, 3, 16, 16)
    out = m.forward_features(x)
    assert out.cls is None
    assert torch.allclose(m(x), out.patches.mean(1))


@pytest.mark.parametrize("cls_token,registers", [(False, 0), (False, 2), (True, 2)])
def test_eval_bank_uses_every_patch_and_the_right_prefix(cls_token: bool, registers: int) -> None:
    """The cached feature bank (fovea eval ...) agrees with forward_features for every token layout."""
    from fovea.eval.bank import forward_bank
    from fovea.eval.linear import FEATURE_GRID, linear_probe
    from fovea.eval.bank import FeatureBank
    m = tiny_vit(cls_token=cls_token, pos_embed="sincos", num_register_tokens=registers).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        cls, mean, reg = forward_bank(m, x, 2)
        out = m.forward_features(x)
        lay = m.get_intermediate_layers(x, n=2, norm=True)
    assert torch.allclose(mean, out.patches.mean(1), atol=1e-6)  # all 16 patches
    assert reg.shape == (3, registers, 48) and torch.allclose(reg, out.registers, atol=1e-6)
    if cls_token:
        assert torch.allclose(cls[:, -1], out.cls, atol=1e-6)
    else:  # each block's slot is its normed mean patch token
        assert torch.allclose(cls[:, -1], mean, atol=1e-6)
        assert torch.allclose(cls[:, 0], lay[0].mean(1), atol=1e-6)
    # the linear grid of a bank without CLS is the mean patch of the last 1 / 4 blocks
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    f = torch.randn(40, 2, 8, generator=g) + 3 * torch.nn.functional.one_hot(y, 8)[:, None].float()
    bank = FeatureBank(f, f[:, -1], torch.zeros(40, 0, 8), y, has_cls=cls_token)
    res = linear_probe(bank, bank, epochs=2, lrs=[0.1])
    assert list(res["grid"]) == (list(FEATURE_GRID) if cls_token else ["last1", "last4"])
    assert bank.subset(torch.arange(5)).has_cls == cls_token


def test_no_cls_attention_picture_is_attention_received() -> None:
    from fovea.eval.pictures import cls_attention
    m = tiny_vit(cls_token=False, pos_embed="sincos", num_register_tokens=2).eval()
    a = cls_attention(m, torch.randn(2, 3, 16, 16))
    assert a.shape == (2, 3, 4, 4)
    # averaged over patch queries, the attention a head gives to patches plus registers sums to 1
    assert bool((a.sum((2, 3)) <= 1 + 1e-5).all()) and bool((a.sum((2, 3)) > 0.5).all())


def test_keep_with_padding_equals_unpadded_subset() -> None:
    m = tiny_vit(cls_token=False, pos_embed="sincos").eval()
    x = torch.randn(1, 3, 16, 16)
    keep = torch.tensor([[0, 3, 5, 15]])
    ref = m.forward_features(x, keep=keep).patches
    padded = torch.tensor([[0, 3, 5, 15, 7, 7]])
    valid = torch.tensor([[True, True, True, True, False, False]])
    got = m.forward_features(x, keep=padded, keep_valid=valid).patches
    assert torch.allclose(got[:, :4], ref, atol=1e-5)
    # the kept tokens see only each other: differs from the full-image tokens at those positions
    full = m.forward_features(x).patches[:, keep[0]]
    assert not torch.allclose(full, ref, atol=1e-3)


def test_predictor_padding_invariant_and_shapes() -> None:
    torch.manual_seed(0)
    p = Predictor(48, 4, 4, pred_dim=24, depth=2, num_heads=3).eval()
    ctx = torch.randn(1, 3, 48)
    ctx_idx, tgt_idx = torch.tensor([[0, 1, 2]]), torch.tensor([[[5, 6], [10, 14]]])
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    ref = p(ctx, ctx_idx, ones(ctx_idx), tgt_idx, ones(tgt_idx))
    assert ref.shape == (2, 2, 48)
    ctx_p = torch.cat([ctx, torch.randn(1, 2, 48)], 1)
    ctx_idx_p = torch.tensor([[0, 1, 2, 9, 9]])
    ctx_v = torch.tensor([[True, True, True, False, False]])
    tgt_idx_p = torch.tensor([[[5, 6, 0], [10, 14, 0]]])
    tgt_v = torch.tensor([[[True, True, False], [True, True, False]]])
    got = p(ctx_p, ctx_idx_p, ctx_v, tgt_idx_p, tgt_v)
    assert torch.allclose(got[:, :2], ref, atol=1e-5)
    # predictions depend on the target position (mask token + position), not only the context
    assert not torch.allclose(ref[0, 0], ref[0, 1], atol=1e-4)


# --------------------------------------------------------------------------- loss

def test_jepa_loss_hand_values_and_zero_at_target() -> None:
    t = torch.randn(3, 5, 8)
    assert jepa_loss(t, t).item() == 0.0
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[:, 3:] = False
    pred = t.clone()
    pred[:, 3:] += 100.0  # errors only in padding: ignored
    assert jepa_loss(pred, t, valid).item() == 0.0
    pred = t.clone()
    pred[0, 0, :4] += 2.0  # one valid patch, half its channels off by 2
    n_valid = 9
    assert jepa_loss(pred, t, valid, "l2").item() == pytest.approx((4 * 4 / 8) / n_valid, rel=1e-5)
    assert jepa_loss(pred, t, valid, "smooth_l1").item() == pytest.approx((4 * 1.5 / 8) / n_valid, rel=1e-5)
    pred = t.clone()
    pred[0, 0, 0] += 0.5
    assert jepa_loss(pred, t, valid, "smooth_l1").item() == pytest.approx(0.125 / 8 / n_valid, rel=1e-5)
    # data-parallel: the denominator is the global patch count per rank, not this rank's count
    assert jepa_loss(pred, t, valid, "smooth_l1", count=torch.tensor(12.0)).item() == pytest.approx(
        0.125 / 8 / 12, rel=1e-5)
    with pytest.raises(ValueError):
        jepa_loss(t, t, kind="l1")


def test_jepa_targets_layer_normalised_and_gather() -> None:
    h = torch.randn(2, 16, 6) * 5 + 3
    t = jepa_targets(h)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)
    idx = torch.tensor([[[1, 2], [3, 4]], [[15, 0], [7, 7]]])
    g = gather_targets(h, idx)
    assert g.shape == (4, 2, 6)
    assert torch.equal(g[1, 0], h[0, 3]) and torch.equal(g[2, 0], h[1, 15]) and torch.equal(g[3, 1], h[1, 7])


# --------------------------------------------------------------------------- method

@pytest.fixture()
def method() -> IJEPA:
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    m = spec_for(cfg.method).build(cfg)
    assert isinstance(m, IJEPA)
    return m.train()


def test_gradients_do_not_reach_target_encoder(method: IJEPA) -> None:
    assert method.teacher.backbone is not method.student.backbone
    assert all(not p.requires_grad for p in method.teacher.parameters())
    loss, logs = method.training_step(batch(), SV)
    assert loss.requires_grad and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert method.student.predictor.mask_token.grad.abs().sum() > 0
    assert method.student.backbone.pos_embed.grad is None  # fixed sin-cos
    assert set(logs) == {"loss/jepa", "diag/target_std", "diag/pred_std"}


def test_loss_zero_when_predictor_returns_targets(method: IJEPA, monkeypatch: pytest.MonkeyPatch) -> None:
    b = batch()
    x = (b["images"].float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h = jepa_targets(method.teacher.backbone.forward_features(x).patches)
    want = gather_targets(h, b["tgt_idx"])
    monkeypatch.setattr(type(method.student), "forward", lambda self, *a: want.clone().requires_grad_(True))
    loss, _ = method.training_step(b, SV)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_after_step_ema_hand_values(method: IJEPA) -> None:
    s0 = [p.detach().clone() for p in method.student.backbone.parameters()]
    with torch.no_grad():
        for p in method.student.backbone.parameters():
            p.add_(1.0)
    t0 = [p.detach().clone() for p in method.teacher.backbone.parameters()]
    method.after_step(StepValues(step=0, epoch=0.0, lr=0.0, weight_decay=0.0, sched={"momentum": 0.75}))
    for a, t, s in zip(method.teacher.backbone.parameters(), t0, s0):
        assert torch.allclose(a, 0.75 * t + 0.25 * (s + 1.0), atol=1e-6)
    assert method.eval_backbone() is method.teacher.backbone
    assert not any(n.startswith("teacher.predictor") for n, _ in method.named_parameters())


def test_subsample_batches_also_train(method: IJEPA) -> None:
    loss, _ = method.training_step(batch(equalize="subsample"), SV)
    assert math.isfinite(loss.item())


# --------------------------------------------------------------------------- config and schedules

def test_published_vith14_recipe() -> None:
    cfg = load_config("ijepa_vith14_imagenet")
    m = cfg.model
    assert (cfg.method, m.arch, m.patch_size, m.img_size, m.cls_token, m.pos_embed) == \
        ("ijepa", "vit_huge", 14, 224, False, "sincos")
    from fovea.models.vit import ARCHS
    assert ARCHS["vit_huge"][:3] == (1280, 32, 16)
    j, o = cfg.ijepa, cfg.optim
    assert (j.num_targets, j.target_scale, j.target_aspect, j.context_scale, j.min_context) == \
        (4, [0.15, 0.2], [0.75, 1.5], [0.85, 1.0], 10)
    assert (j.pred_dim, j.pred_depth, j.loss) == (384, 12, "l2")
    assert (o.epochs, o.start_lr, o.lr, o.lr_scaling, o.warmup_epochs, o.min_lr) == (300, 2e-4, 1e-3, "none", 40, 1e-6)
    assert (o.weight_decay, o.weight_decay_end, o.momentum_teacher, o.momentum_schedule) == (0.04, 0.4, 0.996, "linear")
    assert cfg.train.precision == "bf16" and cfg.data.batch_size * 16 == 2048
    assert cfg.eval.knn.features == "mean_patch"


def test_start_lr_warmup_and_linear_momentum() -> None:
    from fovea.train.plan import make_plan, step_values
    cfg = load_config("ijepa_vith14_imagenet", ["optim.epochs=10", "optim.warmup_epochs=2"])
    plan = make_plan(cfg, n_images=128 * 16 * 5, world=16)  # 5 steps/epoch -> 50 steps, 10 warm-up
    assert (plan.total_steps, plan.warmup_steps, plan.peak_lr) == (50, 10, 1e-3)
    lrs = [step_values(cfg, plan, s).lr for s in (0, 5, 10)]
    assert lrs == pytest.approx([2e-4, 6e-4, 1e-3])
    mom = [step_values(cfg, plan, s).sched["momentum"] for s in (0, 49)]
    assert mom == pytest.approx([0.996, 1.0])
    assert step_values(cfg, plan, 24).sched["momentum"] == pytest.approx(0.996 + 0.004 * 24 / 49)
    dino = load_config("dino_vittiny_cifar10")  # start_lr default 0 keeps warm-up from 0
    p2 = make_plan(dino, 50000, 1)
    assert step_values(dino, p2, 0).lr == 0.0


def test_bad_ijepa_values_named() -> None:
    from fovea.errors import ConfigError
    with pytest.raises(ConfigError, match="ijepa.equalize"):
        load_config("ijepa_vittiny_cifar10", ["ijepa.equalize=truncate"])
    with pytest.raises(ConfigError, match="ijepa.target_scale"):
        load_config("ijepa_vittiny_cifar10", ["ijepa.target_scale=[0.3,0.1]"])
    with pytest.raises(ConfigError, match="model.cls_token"):
        load_config("dino_vittiny_cifar10", ["model.cls_token=false"])
    with pytest.raises(ConfigError, match="model.pos_embed"):
        load_config("ijepa_vittiny_cifar10", ["model.pos_embed=alibi"])
