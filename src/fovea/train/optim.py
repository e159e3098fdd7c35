"""Optimizer parameter groups, per-step hyper-parameter application and gradient clipping."""
from __future__ import annotations

import re

import torch
from torch import nn

from fovea.config.schema import OptimConfig
from fovea.core.schedules import pair
from fovea.train.sharding import is_dtensor, local


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norm weights, LayerScale gammas and other 1-D parameters get no weight decay.

    The prototypes' weight-norm gain ``weight_g`` [K, 1] is decayed like other weights (as in the
    official DINO and DINOv2 parameter groups)."""
    return p.ndim <= 1 or name.endswith((".bias", ".gamma"))


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed")


def layer_id(name: str, depth: int) -> int:
    """Depth index of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1,
    everything after the blocks (final norm, heads) depth + 1."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(part in _EMBED for part in name.split(".")):
        return 0
    return depth + 1


def lr_multiplier(name: str, depth: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> float:
    """``layer_decay ** (depth + 1 - layer_id)``, times ``patch_embed_lr_mult`` for the patch embedding."""
    mult = layer_decay ** (depth + 1 - layer_id(name, depth)) if layer_decay != 1.0 else 1.0
    if "patch_embed" in name.split("."):
        mult *= patch_embed_lr_mult
    return mult


def param_groups(model: nn.Module, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0) -> list[dict]:
    """Trainable parameters grouped by (``wd_mult`` 0 or 1, ``lr_mult``).

    ``lr_mult`` is 1 unless layer-wise decay (``layer_decay`` < 1, over the backbone depth found from
    the ``blocks.N`` names) or a patch-embedding multiplier is set.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depth = 1 + max((int(m.group(1)) for n, _ in named if (m := _BLOCK.search(n))), default=-1)
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, p in named:
        wd = 0.0 if no_weight_decay(name, p) else 1.0
        lr = lr_multiplier(name, depth, layer_decay, patch_embed_lr_mult)
        bb = name.startswith("backbone.")
        g = groups.setdefault((wd, lr, bb), {"params": [], "wd_mult": wd, "lr_mult": lr, "backbone": bb,
                                             "name": ("decay" if wd else "no_decay") + ("" if lr == 1.0 else f"_lr{lr:.4g}")
                                             + ("_backbone" if bb else "")})
        g["params"].append(p)
    return sorted(groups.values(), key=lambda g: (-g["wd_mult"], -g["lr_mult"], not g["backbone"]))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (lr / wd are set every step by :func:`apply_hparams`)."""
    groups = param_groups(model, cfg.layer_decay, cfg.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, betas=pair(cfg.betas), weight_decay=0.0)


def apply_hparams(opt: torch.optim.Optimizer, lr: float, wd: float, backbone_scale: float = 1.0) -> None:
    """Set this step's lr and weight decay on every group, honouring its multipliers; the backbone's
    groups get ``backbone_scale`` on top (continued pretraining: 0 during the head warm-up)."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0) * (backbone_scale if g.get("backbone") else 1.0)
        g["weight_decay"] = wd * g.get("wd_mult", 1.0)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak lr after the configured batch-size scaling rule."""
    if cfg.lr_scaling == "linear256":
        return cfg.lr * global_batch / 256
    if cfg.lr_scaling == "sqrt1024":
        return cfg.lr * (global_batch / 1024) ** 0.5
    return cfg.lr


CLIP_MODES = ("per_param", "global", "per_module")


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float, mode: str,
                   modules: list[list[nn.Parameter]] | None = None) -> float:
    """Clip gradients in place; returns the global norm of all ``params``' gradients before clipping.

    ``per_param`` (DINO v1): each parameter's gradient norm to ``max_norm``. ``global``: the norm of all
    gradients together. ``per_module`` (DINOv2 / Franca): the norm of each group in ``modules`` (the
    backbone, the DINO head, the iBOT head) separately, like ``clip_grad_norm_`` per sub-module. Sharded
    gradients (FSDP) are clipped by the norms of the whole tensors, summed over the shards.
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    grads = [local(p.grad) for p in with_grad]  # type: ignore[arg-type]
    norms = grad_norms([p.grad for p in with_grad])  # type: ignore[misc]
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if max_norm <= 0:
        return total
    if mode == "global":
        _clip_group(grads, norms, max_norm)
    elif mode == "per_module":
        if modules is None:
            raise ValueError("clip mode per_module needs the parameter groups of the sub-modules")
        index = {id(p): i for i, p in enumerate(with_grad)}
        for group in modules:
            at = [index[id(p)] for p in group if id(p) in index]
            _clip_group([grads[i] for i in at], [norms[i] for i in at], max_norm)
    elif mode == "per_param":
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    else:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    return total


def grad_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The L2 norm of each gradient; of each whole tensor for sharded ones (local squares summed over ranks)."""
    if not any(is_dtensor(g) for g in grads):
        return list(torch._foreach_norm(grads))
    sq = torch.stack(torch._foreach_norm([local(g) for g in grads])).double() ** 2
    group = next(g for g in grads if is_dtensor(g)).device_mesh.get_group()  # type: ignore[attr-defined]
    torch.distributed.all_reduce(sq, group=group)
    return list(sq.sqrt().float().unbind())


def _clip_group(grads: list[torch.Tensor], norms: list[torch.Tensor], max_norm: float) -> None:
    """Scale ``grads`` so that their joint norm (from their ``norms``) is at most ``max_norm``
    (coefficient max/(norm+1e-6))."""
    if not grads:
        return
    norm = torch.linalg.vector_norm(torch.stack(norms))
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1:
        torch._foreach_mul_(grads, coef)
