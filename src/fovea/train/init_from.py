"""Continued pretraining: start a run from an existing backbone (``train.init_from``, METHODS.md 5c).

``train.init_from`` names a run folder, an imported folder, a ``backbone.safetensors``, a training
checkpoint or a released file. Its architecture replaces the ``model`` section's architecture keys
(training keys such as drop-path stay the preset's), its weights go into the student and the teacher
backbone, and its heads (``heads.safetensors`` of an imported folder, a fovea run's teacher heads, or a released
file's heads) into both heads when their shapes match the config. Without heads, the fresh heads are trained alone
first (``optim.head_warmup_steps``: backbone lr 0; the teacher heads follow by EMA), then the backbone joins with
``optim.backbone_lr_mult`` and a linear warm-up of ``optim.backbone_warmup_steps``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fovea.config.schema import RunConfig
from fovea.methods.base import Method

#: ViTConfig keys that describe the architecture (taken from the loaded backbone)
ARCH_KEYS = ("arch", "patch_size", "img_size", "in_chans", "num_register_tokens", "ffn", "layerscale_init", "qkv_bias",
             "norm_eps", "embed_dim", "depth", "num_heads", "mlp_ratio", "cls_token", "pos_embed", "sincos_layout",
             "interpolate_offset", "interpolate_antialias", "rope_base", "patch_projection")


def resolve_init_model(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """``cfg`` with the architecture keys of ``train.init_from``'s backbone; returns (cfg, changed keys)."""
    if not cfg.train.init_from:
        return cfg, []
    from fovea.hub.backbone import load_backbone
    try:
        backbone, _ = load_backbone(cfg.train.init_from)
    except (OSError, ValueError) as e:
        raise ValueError(f"train.init_from: {e}") from None
    cfg = copy.deepcopy(cfg)
    src = backbone.cfg
    changed = []
    for k in ARCH_KEYS:
        new = getattr(src, k)
        if k in ("embed_dim", "depth", "num_heads", "mlp_ratio") and not new:
            new = {"embed_dim": backbone.embed_dim, "depth": backbone.depth, "num_heads": backbone.num_heads,
                   "mlp_ratio": 0.0}[k]
        if getattr(cfg.model, k) != new:
            changed.append(f"model.{k}: {getattr(cfg.model, k)!r} -> {new!r}")
            setattr(cfg.model, k, new)
    return cfg, changed


def _load_head(module: nn.Module | None, sd: dict[str, torch.Tensor] | None) -> str:
    if module is None or sd is None:
        return "absent"
    own = module.state_dict()
    if own.keys() != sd.keys() or any(own[k].shape != sd[k].shape for k in own):
        return "shape differs"
    module.load_state_dict(sd)
    return "loaded"


def load_init(method: Method, path: str) -> dict[str, str]:
    """Load the backbone (and matching heads) of ``path`` into the student and teacher of ``method``.

    Returns {"backbone": "loaded", "dino_head": "loaded" | "absent" | "shape differs", ...}."""
    from fovea.hub.backbone import load_backbone
    backbone, _ = load_backbone(path)
    state = backbone.state_dict()
    for net in (method.student, getattr(method, "teacher")):
        target = getattr(net, "backbone")
        assert isinstance(target, nn.Module)
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"train.init_from: backbone keys differ from the model: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}")
    report = {"backbone": "loaded"}
    from fovea.hub.backbone import load_head_states
    heads, _ = load_head_states(path)
    for h, attr in (("dino_head", "head"), ("ibot_head", "patch_head")):
        s_mod = getattr(method.student, attr, None)
        if s_mod is None:
            continue
        if getattr(method.student, "shared_head", False) and attr == "patch_head":
            continue
        got = _load_head(s_mod, heads.get(h))
        if got == "loaded":
            getattr(method.teacher, attr).load_state_dict(heads[h])
        report[h] = got
    return report


def backbone_scale(step: int, head_warmup: int, backbone_warmup: int, mult: float) -> float:
    """Multiplier of the backbone's lr at ``step``: 0 during the head warm-up, then ``mult`` reached
    linearly over ``backbone_warmup`` steps (at once when 0)."""
    if step < head_warmup:
        return 0.0
    if backbone_warmup <= 0:
        return mult
    return mult * min(1.0, (step - head_warmup + 1) / backbone_warmup)
