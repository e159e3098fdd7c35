"""Schedules, the per-step plan, optimizer parameter groups and gradient clipping."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fovea.config.loader import load_config
from fovea.models.heads import DINOHead
from fovea.models.vit import ViTConfig, VisionTransformer
from fovea.train.plan import make_plan, step_values
from fovea.train.optim import apply_hparams, build_optimizer, clip_gradients, param_groups, scaled_lr
from fovea.core.schedules import cosine_schedule, linear_warmup_constant


# --------------------------------------------------------------------------- schedules

def test_cosine_no_warmup_hand_values():
    vals = [cosine_schedule(s, 11, 1.0, 0.0) for s in range(11)]
    assert vals[0] == pytest.approx(1.0, abs=1e-12)
    assert vals[5] == pytest.approx(0.5, abs=1e-12)
    assert vals[10] == pytest.approx(0.0, abs=1e-12)
    # step 2 of 10: 0.5 * (1 + cos(pi/5)) = 0.5 + 0.5 * 0.809017 = 0.9045085
    assert vals[2] == pytest.approx(0.9045084971874737, abs=1e-12)
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert cosine_schedule(20, 11, 1.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_schedule(1000, 11, 2.0, 0.25) == pytest.approx(0.25, abs=1e-12)


def test_cosine_with_warmup_hand_values():
    base, final = 0.8, 0.1
    assert cosine_schedule(0, 14, base, final, warmup=4) == 0.0
    assert cosine_schedule(1, 14, base, final, warmup=4) == pytest.approx(0.2)
    assert cosine_schedule(2, 14, base, final, warmup=4) == pytest.approx(base / 2)
    assert cosine_schedule(4, 14, base, final, warmup=4) == pytest.approx(base)
    # after warm-up: 9 cosine steps from step 4 to 13; step 8 is t = 4/9
    t = 4 / 9
    assert cosine_schedule(8, 14, base, final, warmup=4) == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * t)))
    assert cosine_schedule(13, 14, base, final, warmup=4) == pytest.approx(final)
    assert cosine_schedule(50, 14, base, final, warmup=4) == pytest.approx(final)
    # warm-up from a non-zero start
    assert cosine_schedule(1, 14, 1.0, 0.0, warmup=4, start_warmup=0.2) == pytest.approx(0.4)


def test_linear_warmup_constant():
    assert linear_warmup_constant(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup_constant(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup_constant(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup_constant(99, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup_constant(0, 0, 0.04, 0.07) == pytest.approx(0.07)  # no warm-up: the end value


# --------------------------------------------------------------------------- plan / step values

def _cfg(extra):
    return load_config(None, ["data.batch_size=32", "optim.epochs=5", "optim.warmup_epochs=1", "optim.lr=5e-4",
                              "optim.min_lr=1e-6", "optim.freeze_last_layer_epochs=1",
                              "dino.warmup_teacher_temp=0.04", "dino.teacher_temp=0.07",
                              "dino.warmup_teacher_temp_epochs=2", "optim.momentum_teacher=0.996",
                              "optim.momentum_teacher_end=1.0", "optim.weight_decay=0.04",
                              "optim.weight_decay_end=0.4", "optim.lr_scaling=linear256"] + extra)


def test_plan_linear256_lr_and_schedules():
    cfg = _cfg([])
    world, n = 2, 32 * 2 * 10 + 7  # 10 full global batches per epoch, remainder dropped
    plan = make_plan(cfg, n, world)
    assert plan.steps_per_epoch == 10
    assert plan.total_steps == 50
    assert plan.warmup_steps == 10
    assert plan.steps(cfg.dino.warmup_teacher_temp_epochs) == 20
    assert plan.steps(cfg.optim.freeze_last_layer_epochs) == 10
    assert plan.peak_lr == pytest.approx(5e-4 * 64 / 256)
    sv0 = step_values(cfg, plan, 0)
    assert sv0.lr == pytest.approx(0.0)
    assert step_values(cfg, plan, 5).lr == pytest.approx(plan.peak_lr / 2)
    assert step_values(cfg, plan, 10).lr == pytest.approx(1.25e-4)
    assert step_values(cfg, plan, 49).lr == pytest.approx(1e-6)
    # teacher temperature 0.04 -> 0.07 linearly over 20 steps, then constant
    assert sv0.sched["teacher_temp"] == pytest.approx(0.04)
    assert step_values(cfg, plan, 10).sched["teacher_temp"] == pytest.approx(0.055)
    assert step_values(cfg, plan, 15).sched["teacher_temp"] == pytest.approx(0.04 + 0.03 * 15 / 20)
    assert step_values(cfg, plan, 20).sched["teacher_temp"] == pytest.approx(0.07)
    assert step_values(cfg, plan, 49).sched["teacher_temp"] == pytest.approx(0.07)
    # teacher momentum 0.996 -> 1.0, weight decay 0.04 -> 0.4 (cosine over the whole run)
    assert sv0.sched["momentum"] == pytest.approx(0.996)
    assert step_values(cfg, plan, 49).sched["momentum"] == pytest.approx(1.0)
    mid = step_values(cfg, plan, 49 // 2)  # not the exact middle: 24/49
    t = 24 / 49
    assert mid.sched["momentum"] == pytest.approx(1.0 + 0.5 * (0.996 - 1.0) * (1 + math.cos(math.pi * t)))
    assert sv0.weight_decay == pytest.approx(0.04)
    assert step_values(cfg, plan, 49).weight_decay == pytest.approx(0.4)
    # freeze last layer exactly for the first 10 steps
    assert [step_values(cfg, plan, s).sched["freeze_last_layer"] for s in range(12)] == [1.0] * 10 + [0.0] * 2
    assert step_values(cfg, plan, 23).epoch == pytest.approx(2.3)


def test_plan_sqrt1024_and_none():
    cfg = _cfg(["optim.lr_scaling=sqrt1024", "optim.lr=1e-3", "data.batch_size=64"])
    plan = make_plan(cfg, 64 * 4 * 3, 4)  # global batch 256
    assert plan.peak_lr == pytest.approx(1e-3 * math.sqrt(256 / 1024))
    assert plan.peak_lr == pytest.approx(5e-4)
    cfg = _cfg(["optim.lr_scaling=none"])
    assert make_plan(cfg, 1000, 1).peak_lr == pytest.approx(5e-4)
    assert scaled_lr(_cfg([]).optim, 1024) == pytest.approx(5e-4 * 4)


def test_plan_max_steps_and_too_small_dataset():
    cfg = _cfg(["optim.max_steps=7"])
    assert make_plan(cfg, 32 * 100, 1).total_steps == 7
    with pytest.raises(ValueError):
        make_plan(cfg, 31, 1)


# --------------------------------------------------------------------------- parameter groups

def _model():
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(arch="vit_tiny", depth=2, embed_dim=48, num_heads=3, patch_size=4, img_size=16,
                                      layerscale_init=1e-5, num_register_tokens=1))
    head = DINOHead(48, 32, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    return nn.ModuleDict({"backbone": vit, "head": head})


def test_param_groups_decay_split():
    model = _model()
    groups = param_groups(model)
    # backbone and head parameters sit in separate groups (the backbone lr multiplier of continued pretraining)
    assert {g["name"] for g in groups} == {"decay_backbone", "no_decay_backbone", "decay", "no_decay"}
    assert all(g["backbone"] == all(id(p) in {id(q) for q in model["backbone"].parameters()} for p in g["params"])
               for g in groups)
    decay = {id(p) for g in groups if g["wd_mult"] == 1.0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["wd_mult"] == 0.0 for p in g["params"]}
    assert not decay & no_decay
    named = dict(model.named_parameters())
    assert decay | no_decay == {id(p) for p in named.values()}
    must_no_decay = ["backbone.blocks.0.attn.qkv.bias", "backbone.blocks.1.mlp.fc2.bias", "backbone.patch_embed.proj.bias",
                     "backbone.blocks.0.norm1.weight", "backbone.blocks.1.norm2.bias", "backbone.norm.weight",
                     "backbone.blocks.0.ls1.gamma", "backbone.blocks.1.ls2.gamma", "head.mlp.0.bias"]
    must_decay = ["backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.attn.proj.weight",
                  "backbone.blocks.1.mlp.fc1.weight", "backbone.patch_embed.proj.weight", "backbone.pos_embed",
                  "backbone.cls_token", "head.mlp.0.weight", "head.last_layer.weight_v",
                  "head.last_layer.weight_g"]  # the trained weight-norm gain decays (official DINO / DINOv2 groups)
    for name in must_no_decay:
        assert id(named[name]) in no_decay, name
    for name in must_decay:
        assert id(named[name]) in decay, name


def test_param_groups_skip_frozen_and_apply_hparams():
    torch.manual_seed(0)
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    ids = {id(p) for g in param_groups(head) for p in g["params"]}
    assert id(head.last_layer.weight_g) not in ids
    cfg = load_config(None, [])
    opt = build_optimizer(head, cfg.optim)
    apply_hparams(opt, 0.01, 0.3)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay"]["lr"] == pytest.approx(0.01) and by_name["decay"]["weight_decay"] == pytest.approx(0.3)
    assert by_name["no_decay"]["lr"] == pytest.approx(0.01) and by_name["no_decay"]["weight_decay"] == 0.0


# --------------------------------------------------------------------------- gradient clipping

def _params_with_grads(norms: list[float], seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, n in enumerate(norms):
        p = nn.Parameter(torch.zeros(3 + i, 2))
        d = torch.randn(p.shape, generator=g)
        p.grad = d / d.norm() * n
        ps.append(p)
    return ps


def _norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(v * v for v in t.flatten().tolist()))


def test_clip_per_param():
    ps = _params_with_grads([0.5, 2.0, 10.0, 1.0 - 1e-3])
    before = [p.grad.clone() for p in ps]
    total = clip_gradients(ps, 1.0, "per_param")
    assert total == pytest.approx(math.sqrt(0.25 + 4 + 100 + (1 - 1e-3) ** 2), rel=1e-5)
    for p, b in zip(ps, before):
        n_before = _norm(b)
        if n_before <= 1.0:
            assert torch.equal(p.grad, b)  # untouched
        else:
            assert _norm(p.grad) <= 1.0 + 1e-6
            assert _norm(p.grad) == pytest.approx(1.0, abs=1e-4)
            assert torch.allclose(p.grad * n_before, b, atol=1e-4)  # same direction


def test_clip_global():
    ps = _params_with_grads([0.5, 2.0, 10.0])
    ps.append(nn.Parameter(torch.zeros(2)))  # no grad: ignored
    before = [p.grad.clone() if p.grad is not None else None for p in ps]
    total = clip_gradients(ps, 2.0, "global")
    exp_total = math.sqrt(0.25 + 4 + 100)
    assert total == pytest.approx(exp_total, rel=1e-5)
    after_total = math.sqrt(sum(_norm(p.grad) ** 2 for p in ps if p.grad is not None))
    assert after_total == pytest.approx(2.0, abs=1e-4)
    scale = 2.0 / exp_total
    for p, b in zip(ps, before):
        if b is None:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, b * scale, atol=1e-6)
    # below the threshold: untouched
    ps = _params_with_grads([0.1, 0.2])
    before = [p.grad.clone() for p in ps]
    clip_gradients(ps, 5.0, "global")
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


def test_clip_per_module_clips_each_group_to_max_norm():
    # three "sub-modules" with joint gradient norms 5 (two params 3, 4), 0.5 and 13 (5, 12)
    groups = [_params_with_grads([3.0, 4.0]), _params_with_grads([0.5]), _params_with_grads([5.0, 12.0])]
    ps = [p for g in groups for p in g]
    before = [p.grad.clone() for p in ps]
    total = clip_gradients(ps, 3.0, "per_module", groups)
    assert total == pytest.approx(math.sqrt(25 + 0.25 + 169), rel=1e-5)
    joint = [math.sqrt(sum(_norm(p.grad) ** 2 for p in g)) for g in groups]
    assert joint == pytest.approx([3.0, 0.5, 3.0], abs=1e-4)  # each group to 3 (or untouched below it)
    coefs = [3.0 / 5.0, 1.0, 3.0 / 13.0]
    i = 0
    for g, c in zip(groups, coefs):
        for p in g:  # a group keeps its direction: every parameter scaled by the group's coefficient
            assert torch.allclose(p.grad, before[i] * c, atol=1e-6)
            i += 1
    with pytest.raises(ValueError, match="per_module"):
        clip_gradients(ps, 3.0, "per_module")
    with pytest.raises(ValueError, match="clip mode"):
        clip_gradients(ps, 3.0, "nope")


def test_dinov2_clip_groups_are_backbone_dino_head_ibot_head():
    from fovea.methods.dino import DINO
    cfg = load_config("dinov2_vittiny_cifar10", ["dino.out_dim=32", "dino.hidden_dim=16", "dino.bottleneck_dim=8",
                                                 "ibot.out_dim=32", "ibot.hidden_dim=16", "ibot.bottleneck_dim=8"])
    assert cfg.optim.clip_mode == "per_module" and cfg.optim.clip_grad == 3.0
    m = DINO(cfg)
    groups = m.clip_groups()
    want = [m.student.backbone, m.student.head, m.student.patch_head]
    assert [{id(p) for p in g} for g in groups] == [{id(p) for p in w.parameters() if p.requires_grad} for w in want]


def test_clip_off_returns_norm_and_leaves_grads():
    ps = _params_with_grads([3.0, 4.0])
    before = [p.grad.clone() for p in ps]
    assert clip_gradients(ps, 0.0, "per_param") == pytest.approx(5.0, rel=1e-5)
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))


def test_auto_prototypes_and_momentum_rules() -> None:
    from fovea.core.schedules import auto_momentum
    from fovea.methods.dino_spec import auto_prototypes
    from fovea.train.plan import resolve_auto
    from fovea.config.loader import load_config
    # K: power of two nearest N/16, clamped to [1024, 65536]
    assert auto_prototypes(60000) == 4096  # 60000/16 = 3750 -> 2^12
    assert auto_prototypes(1_281_167) == 65536  # ImageNet-1k -> DINO's K
    assert auto_prototypes(500) == 1024
    # momentum: 1 - 10/steps within [0.95, 0.996]
    assert auto_momentum(500) == pytest.approx(0.98)
    assert auto_momentum(10) == 0.95 and auto_momentum(1_000_000) == 0.996
    cfg = load_config(None, ["data.batch_size=100", "optim.epochs=2"])
    assert (cfg.dino.out_dim, cfg.optim.momentum_teacher) == (None, None)  # auto until resolved
    r = resolve_auto(cfg, 50_000, world=1)  # 500 steps/epoch x 2
    assert (r.dino.out_dim, r.optim.momentum_teacher) == (4096, pytest.approx(0.99))
    assert cfg.dino.out_dim is None  # the input config is not modified
    # configs written before these keys were optional said 0 for auto: read as null
    old = load_config(None, ["dino.out_dim=0", "optim.momentum_teacher=0", "ibot.out_dim=0", "model.embed_dim=0"])
    assert (old.dino.out_dim, old.optim.momentum_teacher, old.ibot.out_dim, old.model.embed_dim) == (None, None, None, None)
    from fovea.config.loader import to_dict
    from fovea.train.runfolder import trajectory_diff
    legacy = to_dict(cfg)
    legacy["dino"]["out_dim"], legacy["optim"]["momentum_teacher"] = 0, 0.0
    assert trajectory_diff(legacy, to_dict(cfg)) == []  # an old run's config resumes under today's
    assert trajectory_diff(legacy, to_dict(r)) != []
    # a key added since an old run was made counts as its default there (the old code ran without it)
    del legacy["gram"], legacy["optim"]["head_warmup_teacher"]
    assert trajectory_diff(legacy, to_dict(cfg)) == []
    changed = load_config(None, ["data.batch_size=100", "optim.epochs=2", "gram.enabled=true"])
    assert trajectory_diff(legacy, to_dict(changed)) == ["gram.enabled: False -> True"]


def test_trajectory_diff_allows_another_layout_of_the_same_global_batch() -> None:
    from fovea.config.loader import to_dict
    from fovea.train.runfolder import trajectory_diff
    two = to_dict(load_config(None, ["data.batch_size=4"]))
    acc = to_dict(load_config(None, ["data.batch_size=4", "train.accumulate=2", "train.strategy=fsdp"]))
    eight = to_dict(load_config(None, ["data.batch_size=8"]))
    assert trajectory_diff(two, acc, 2, 1) == []  # 2 ranks x 4 -> 1 process x 4 x 2 accumulated
    assert trajectory_diff(two, eight, 2, 1) == []  # -> 1 process x 8
    assert trajectory_diff(acc, two, 1, 2) == []  # and back
    assert trajectory_diff(two, two, 2, 1) == ["world size (ranks): 2 -> 1"]  # half the global batch
    assert trajectory_diff(two, acc, 1, 1) == ["train.accumulate: 1 -> 2"]
    assert trajectory_diff(two, eight, None, 1) == ["data.batch_size: 4 -> 8"]  # world unknown: no layout rule
