"""Optimizer parameter groups, per-step hyper-parameter application and gradient clipping."""
from __future__ import annotations

import torch
from torch import nn

from fovea.config.schema import OptimConfig


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Biases, norm weights, LayerScale gammas and other 1-D parameters get no weight decay."""
    return p.ndim <= 1 or name.endswith((".bias", ".gamma", "weight_g"))


def param_groups(model: nn.Module) -> list[dict]:
    """Split trainable parameters into groups with ``wd_mult`` (0 or 1) and ``lr_mult`` (1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "wd_mult": 1.0, "lr_mult": 1.0, "name": "decay"},
              {"params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups` (lr / wd are set every step by :func:`apply_hparams`)."""
    return torch.optim.AdamW(param_groups(model), lr=0.0, betas=tuple(cfg.betas), weight_decay=0.0)


def apply_hparams(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Set this step's lr and weight decay on every group, honouring its multipliers."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = wd * g.get("wd_mult", 1.0)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak lr after the configured batch-size scaling rule."""
    if cfg.lr_scaling == "linear256":
        return cfg.lr * global_batch / 256
    if cfg.lr_scaling == "sqrt1024":
        return cfg.lr * (global_batch / 1024) ** 0.5
    return cfg.lr


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float, mode: str) -> float:
    """Clip per parameter (DINO v1) or by the global norm. Returns the global norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms)).item()
    if max_norm <= 0:
        return total
    if mode == "global":
        coef = max_norm / (total + 1e-6)
        if coef < 1:
            torch._foreach_mul_(grads, coef)
    else:
        coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return total
