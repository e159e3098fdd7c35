"""DINOv2 backbone machinery: packed multi-crop forward, efficient stochastic depth, SwiGLU,
layer-wise lr decay, the DINOv2 training step, high-resolution phase and the DINOv2 presets."""
from __future__ import annotations

import pytest
import torch

from fovea.config.loader import load_config
from helpers import REPO, TINY_MODEL
from fovea.errors import ConfigError
from fovea.methods.base import StepValues
from fovea.methods.dino import DINO
from fovea.models.packing import PackedLayout
from fovea.models.layers import Block, swiglu_hidden
from fovea.models.vit import ViTConfig, VisionTransformer
from fovea.train.optim import lr_multiplier, param_groups

SMALL = dict(arch="vit_tiny", depth=2, embed_dim=48, num_heads=3, patch_size=4, img_size=16,
             layerscale_init=0.1, num_register_tokens=2)


def _crops(b: int = 3, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(b, 3, 8, 8, generator=g)
                                                                       for _ in range(3)]
    masks = [torch.rand(b, 16, generator=g) < 0.4, torch.rand(b, 16, generator=g) < 0.4, None, None, None]
    return xs, masks


@pytest.mark.parametrize("impl", ["segments", "mask", "njt"])
@pytest.mark.parametrize("ffn", ["mlp", "swiglu"])
def test_packed_equals_unpacked(impl: str, ffn: str) -> None:
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(**SMALL, drop_path_rate=0.0, ffn=ffn, packing="unpacked", packed_attention=impl))
    xs, masks = _crops()
    ref = m.forward_features_list(xs, masks)
    loss_ref = sum(o.cls.square().sum() + o.patches.sum() for o in ref)
    grads_ref = torch.autograd.grad(loss_ref, list(m.parameters()), allow_unused=True)
    m.cfg.packing = "packed"
    out = m.forward_features_list(xs, masks)
    for a, b in zip(ref, out):
        for key in ("cls", "registers", "patches", "prenorm"):
            x, y = getattr(a, key), getattr(b, key)
            assert x.shape == y.shape
            assert torch.allclose(x, y, atol=1e-5), (key, (x - y).abs().max())
        assert (a.masks is None) == (b.masks is None)
    loss = sum(o.cls.square().sum() + o.patches.sum() for o in out)
    for ga, gb in zip(grads_ref, torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)):
        assert (ga is None and gb is None) or torch.allclose(ga, gb, rtol=1e-4, atol=1e-4)


def test_packed_layout_attention_is_block_diagonal() -> None:
    # changing the tokens of sequence 1 must not change the output of sequences 0 and 2
    lay = PackedLayout(((2, 3), (1, 2)), "mask")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(8, 2, 4, generator=g)
    out = lay.attention(q, q, q)
    q2 = q.clone()
    q2[3:6] += 5.0
    out2 = lay.attention(q2, q2, q2)
    assert torch.allclose(out[:3], out2[:3]) and torch.allclose(out[6:], out2[6:])
    assert not torch.allclose(out[3:6], out2[3:6])
    assert torch.allclose(PackedLayout(lay.groups, "segments").attention(q, q, q), out, atol=1e-6)


def _block(mode: str, p: float) -> Block:
    torch.manual_seed(0)
    return Block(8, 2, 2.0, True, p, 0.0, 1e-6, drop_path_mode=mode)


@pytest.mark.parametrize("packed", [False, True])
def test_efficient_drop_path_same_expectation_as_plain(packed: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, n = 10, 3
    x = torch.randn(b, n, 8, generator=g)
    lay = PackedLayout(((b, n),)) if packed else None
    xin = x.reshape(b * n, 8) if packed else x
    blk = _block("efficient", 0.5)
    with torch.no_grad():
        blk.eval()
        full = blk(xin, layout=lay)  # eval: every branch applied once
        blk.train()
        torch.manual_seed(1)
        outs = torch.stack([blk(xin, layout=lay) for _ in range(1500)])
        plain = _block("plain", 0.5).train()
        torch.manual_seed(2)
        outs_plain = torch.stack([plain(xin, layout=lay) for _ in range(1500)])
    # E[efficient] = E[plain]: both should average to ... the same function of x; compare the means
    # with each other within Monte-Carlo error, and the efficient one's attention-free case below
    diff = (outs.mean(0) - outs_plain.mean(0)).abs().max().item()
    spread = outs.std(0).max().item() / 1500 ** 0.5
    assert diff < 6 * spread + 1e-6, (diff, spread)
    # efficient: exactly int(b * 0.5) = 5 samples get each branch; the others are untouched by it
    torch.manual_seed(3)
    with torch.no_grad():
        blk.mlp.fc2.weight.zero_()
        blk.mlp.fc2.bias.zero_()  # MLP branch = 0: only the attention branch changes rows
        one = blk(xin, layout=lay).reshape(b, n, 8)
    changed = (one - x).abs().amax(dim=(1, 2)) > 1e-7
    assert int(changed.sum()) == 5
    assert full.shape == xin.shape


def test_efficient_drop_path_rescales_by_b_over_kept() -> None:
    # a block whose attention branch is zero and whose MLP branch is a known function of x
    blk = _block("efficient", 0.25).train()
    with torch.no_grad():
        blk.attn.proj.weight.zero_()
        blk.attn.proj.bias.zero_()
        x = torch.randn(8, 2, 8)
        blk.eval()
        branch = blk(x) - x
        blk.train()
        torch.manual_seed(0)
        out = blk(x)
    kept = (out - x).abs().amax(dim=(1, 2)) > 1e-7
    assert int(kept.sum()) == 6  # int(8 * 0.75)
    assert torch.allclose((out - x)[kept], branch[kept] * 8 / 6, atol=1e-5)


def test_uniform_drop_path_and_swiglu_names() -> None:
    m = VisionTransformer(ViTConfig(**SMALL, drop_path_rate=0.3, drop_path_uniform=True, ffn="swiglu"))
    assert [b.drop_path_rate for b in m.blocks] == [0.3, 0.3]
    names = dict(m.named_parameters())
    assert names["blocks.0.mlp.w12.weight"].shape == (2 * swiglu_hidden(48, 4.0), 48)
    assert names["blocks.0.mlp.w3.weight"].shape == (48, swiglu_hidden(48, 4.0))
    assert swiglu_hidden(1536, 4.0) == 4096  # ViT-g: the published 4096
    assert swiglu_hidden(48, 4.0) == 128  # 2/3 * 192 = 128
    linear = VisionTransformer(ViTConfig(**SMALL, drop_path_rate=0.3))
    assert [b.drop_path_rate for b in linear.blocks] == [0.0, 0.3]


def test_layer_decay_multipliers_by_hand() -> None:
    d = 12
    assert lr_multiplier("backbone.blocks.11.attn.qkv.weight", d, 0.9) == pytest.approx(0.9)
    assert lr_multiplier("backbone.blocks.0.mlp.fc1.weight", d, 0.9) == pytest.approx(0.9 ** 12)
    assert lr_multiplier("backbone.pos_embed", d, 0.9) == pytest.approx(0.9 ** 13)
    assert lr_multiplier("backbone.patch_embed.proj.weight", d, 0.9, 0.2) == pytest.approx(0.2 * 0.9 ** 13)
    assert lr_multiplier("backbone.norm.weight", d, 0.9) == 1.0
    assert lr_multiplier("head.last_layer.weight_v", d, 0.9) == 1.0
    assert lr_multiplier("backbone.patch_embed.proj.bias", d, 1.0, 0.2) == pytest.approx(0.2)
    m = VisionTransformer(ViTConfig(**SMALL, drop_path_rate=0.0))
    groups = param_groups(m, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert by_param[id(named["blocks.1.attn.qkv.weight"])]["lr_mult"] == pytest.approx(0.5)
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["lr_mult"] == pytest.approx(0.25)
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_mult"] == pytest.approx(0.2 * 0.125)
    assert by_param[id(named["blocks.0.ls1.gamma"])]["wd_mult"] == 0.0
    assert by_param[id(named["blocks.0.norm1.weight"])]["wd_mult"] == 0.0
    assert by_param[id(named["blocks.0.attn.qkv.bias"])]["wd_mult"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


# --------------------------------------------------------------------------- the DINOv2 step

TINY = ["method=dinov2", *TINY_MODEL, "dino.centering=sinkhorn", "ibot.enabled=true", "ibot.out_dim=32",
        "koleo.weight=0.1", "model.layerscale_init=1e-5"]
SV = StepValues(step=0, epoch=0.0, lr=1e-3, weight_decay=0.04,
                sched={"momentum": 0.996, "teacher_temp": 0.04, "freeze_last_layer": 0.0})


def _batch(b: int = 4, all_masked: bool | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (b, 3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(2)]
    crops += [torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(2)]
    masks = torch.rand(2 * b, 16, generator=g) < 0.4
    if all_masked is not None:
        masks[:] = all_masked
    return {"crops": crops, "masks": masks}


@pytest.mark.parametrize("extra", [[], ["ibot.separate_head=false", "ibot.centering=ema"],
                                   ["model.packing=packed", "model.drop_path_rate=0.2", "model.num_register_tokens=4",
                                    "model.drop_path_mode=efficient"]])
def test_dinov2_training_step(extra: list[str]) -> None:
    cfg = load_config(None, TINY + extra)
    torch.manual_seed(0)
    m = DINO(cfg).train()
    loss, logs = m.training_step(_batch(), SV)
    w = cfg.koleo.weight
    assert float(logs["loss/total"]) == pytest.approx(
        float(logs["loss/dino"]) + float(logs["loss/ibot"]) + w * float(logs["loss/koleo"]), rel=1e-5)
    assert float(logs["loss/ibot"]) > 0 and torch.isfinite(loss)
    loss.backward()
    s = m.student
    assert s.backbone.mask_token.grad is not None and s.backbone.mask_token.grad.abs().sum() > 0
    head_p = s.head if cfg.ibot.separate_head is False else s.patch_head
    assert head_p.last_layer.weight_v.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    assert len(m.last_layer_params()) == (2 if cfg.ibot.separate_head else 1) * 2


def test_ibot_loss_uses_teacher_tokens_at_masked_positions() -> None:
    """Independent recomputation of the patch term from the two networks' outputs."""
    from fovea.data.augment import normalize
    from fovea.losses.sinkhorn import sinkhorn_knopp
    cfg = load_config(None, TINY + ["koleo.weight=0"])
    torch.manual_seed(0)
    m = DINO(cfg).eval()
    batch = _batch()
    _, logs = m.training_step(batch, SV)
    c = cfg.crops
    crops = [normalize(x, c.mean, c.std) for x in batch["crops"]]
    masks, b = batch["masks"], 4
    with torch.no_grad():
        t_out = m.teacher.backbone.forward_features_list(crops[:2])
        s_out = m.student.backbone.forward_features_list(crops[:2], [masks[:b], masks[b:]])
        t_tok = torch.cat([o.patches for o in t_out])
        s_tok = torch.cat([o.patches for o in s_out])
        expected = 0.0
        targets = sinkhorn_knopp(m.teacher.patch_head.logits(t_tok[masks]), 0.04, 3)
        log_s = torch.log_softmax(m.student.patch_head.logits(s_tok[masks]) / 0.1, -1)
        per_patch = -(targets * log_s).sum(-1)
        owner = masks.nonzero()[:, 0]
        for img in range(2 * b):
            sel = owner == img
            if sel.any():
                expected += per_patch[sel].mean().item()
    assert float(logs["loss/ibot"]) == pytest.approx(expected / (2 * b), rel=1e-4)


def test_dinov2_step_without_any_masked_patch() -> None:
    m = DINO(load_config(None, TINY)).train()
    loss, logs = m.training_step(_batch(all_masked=False), SV)
    assert float(logs["loss/ibot"]) == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert m.student.patch_head.last_layer.weight_v.grad is not None  # in the graph (DDP-safe)


def test_plain_dino_does_not_use_mask_token_or_patch_head() -> None:
    cfg = load_config(None, [t for t in TINY if not t.startswith(("ibot", "koleo", "dino.centering", "method"))])
    m = DINO(cfg)
    assert m.student.patch_head is None and not m.student.backbone.mask_token.requires_grad
    assert cfg.method == "dino" and cfg.dino.centering == "ema"


# --------------------------------------------------------------------------- loop pieces and presets

def test_highres_phase_switch_and_dataset(tmp_path) -> None:
    import numpy as np

    from fovea.data.base import ImageSource
    from fovea.core.plan import Plan
    from fovea.methods.dino_spec import phase, train_data
    cfg = load_config(None, TINY + ["highres.steps=3", "highres.global_size=24", "highres.local_size=12"])
    plan = Plan(steps_per_epoch=10, total_steps=20, warmup_steps=0, checkpoint_every=10, eval_every=0, peak_lr=1e-3,
                epoch_unit=10)
    assert [phase(cfg, plan, s) for s in (0, 16, 17, 19)] == ["", "", "highres", "highres"]

    class Src(ImageSource):
        labels = np.zeros(4, dtype=np.int64)
        class_names = ["x"]

        def load(self, i: int) -> np.ndarray:
            return np.full((20, 20, 3), 60 * i, dtype=np.uint8)

    src = Src()
    lo, hi = train_data(cfg, src)[0], train_data(cfg, src, "highres")[0]
    crops, _, masks = lo[(0, 1)]
    assert crops[0].shape[-1] == 16 and crops[2].shape[-1] == 8 and masks.shape == (2, 16)
    crops, _, masks = hi[(0, 1)]
    assert crops[0].shape[-1] == 24 and crops[2].shape[-1] == 12 and masks.shape == (2, 36)
    with pytest.raises(ConfigError, match="highres.global_size"):
        load_config(None, TINY + ["highres.global_size=10"])


def test_dinov2_presets() -> None:
    v = load_config("dinov2_vitl14_imagenet22k")
    assert (v.method, v.model.arch, v.model.patch_size, v.model.layerscale_init) == ("dinov2", "vit_large", 14, 1e-5)
    assert (v.data.batch_size, v.optim.max_steps, v.optim.lr, v.optim.lr_scaling) == (32, 625000, 2e-4, "sqrt1024")
    assert (v.optim.weight_decay, v.optim.weight_decay_end, v.optim.momentum_teacher) == (0.04, 0.2, 0.994)
    assert (v.dino.warmup_teacher_temp, v.dino.teacher_temp, v.model.drop_path_rate) == (0.04, 0.07, 0.4)
    assert v.model.drop_path_uniform and v.model.drop_path_mode == "efficient"
    assert (v.optim.clip_grad, v.optim.clip_mode, v.dino.out_dim, v.dino.bottleneck_dim) == (3.0, "per_module", 131072, 384)
    assert (v.ibot.mask_prob, v.ibot.mask_ratio, v.koleo.weight, v.dino.centering) == (0.5, [0.1, 0.5], 0.1, "sinkhorn")
    assert (v.highres.steps, v.highres.global_size) == (10000, 518)
    assert (v.crops.global_size, v.crops.local_size, v.crops.n_local) == (224, 98, 8)
    assert v.crops.global_scale == [0.32, 1.0] and v.crops.local_scale == [0.05, 0.32]
    for name in ("dinov2_vittiny_cifar10", "dinov2_vits14_imagenette", "dinov2_vitl14_imagenet22k",
                 "franca_vittiny_cifar10", "franca_vits14_imagenette", "franca_vitb14_imagenet21k"):
        cfg = load_config(name)
        # official DINOv2 / Franca heads: trained weight-norm gain, clipping per sub-module to 3.0
        assert cfg.dino.norm_last_layer is False and (cfg.optim.clip_mode, cfg.optim.clip_grad) == ("per_module", 3.0)
        assert cfg.ibot.enabled and cfg.koleo.weight == 0.1 and cfg.dino.centering == "sinkhorn"
        # the official code's inverted blur probabilities stay off: intended 1.0 / 0.1 / locals
        assert cfg.crops.dinov2_inverted_blur is False
        assert cfg.crops.effective_blur_p() == cfg.crops.blur_p
    inv = load_config("dinov2_vitl14_imagenet22k", ["crops.dinov2_inverted_blur=true"])
    assert inv.crops.effective_blur_p() == pytest.approx([0.0, 0.9, 0.5])


def test_epoch_length_turns_dinov2_epochs_into_steps() -> None:
    from fovea.methods.dino_spec import schedule
    from fovea.train.plan import make_plan
    cfg = load_config("dinov2_vitl14_imagenet22k")
    plan = make_plan(cfg, 14_197_122, 96)
    assert (plan.total_steps, plan.warmup_steps, plan.steps(cfg.dino.warmup_teacher_temp_epochs)) == (625_000, 100_000, 37_500)
    sched = schedule(cfg, plan)  # teacher temperature warm-up over 30 epochs of 1250 steps; prototypes frozen in epoch 0
    assert sched(37_499)["teacher_temp"] < 0.07 and sched(37_500)["teacher_temp"] == pytest.approx(0.07)
    assert (sched(1249)["freeze_last_layer"], sched(1250)["freeze_last_layer"]) == (1.0, 0.0)
    assert plan.steps_per_epoch == 14_197_122 // 3072
    assert plan.peak_lr == pytest.approx(2e-4 * 3 ** 0.5)


def test_packing_droppath_benchmark_smoke(tmp_path) -> None:
    import importlib.util
    import json
    script = REPO / "benchmarks" / "packing_droppath.py"
    spec = importlib.util.spec_from_file_location("packing_droppath", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    n = torch.get_num_threads()
    try:
        out = tmp_path / "b.json"
        assert mod.main(["dinov2_vittiny_cifar10", "model.depth=1", "model.embed_dim=48", "model.num_heads=3",
                         "--batch-size", "2", "--steps", "1", "--warmup", "0", "--impls", "segments,mask",
                         "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads(out.read_text())
    names = [r["variant"] for r in res["rows"]]
    assert names == ["unpacked", "packed/segments", "packed/mask", "unpacked dp0.4/plain",
                     "packed/segments dp0.4/plain", "packed/mask dp0.4/plain", "unpacked dp0.4/efficient",
                     "packed/segments dp0.4/efficient", "packed/mask dp0.4/efficient"]
    # 2 images x (2 global crops of 1 + 16 tokens + 6 local crops of 1 + 4 tokens)
    assert res["tokens_per_step"] == 2 * (2 * 17 + 6 * 5)
    assert all(r["median_s"] > 0 for r in res["rows"]) and res["rows"][0]["speedup_vs_unpacked"] == 1.0
