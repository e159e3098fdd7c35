"""Per-iteration schedules: warm-up + cosine, and linear warm-up then constant."""
from __future__ import annotations

import math


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0,
                    start_warmup: float = 0.0) -> float:
    """Linear warm-up from ``start_warmup`` to ``base`` over ``warmup`` steps, then cosine to ``final``.

    Step ``warmup`` gives ``base``; step ``total - 1`` gives ``final``; later steps stay at ``final``.
    """
    if step < warmup:
        return start_warmup + (base - start_warmup) * step / warmup
    span = max(total - 1 - warmup, 1)
    t = min((step - warmup) / span, 1.0)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


def linear_warmup_constant(step: int, warmup: int, start: float, end: float) -> float:
    """Linear from ``start`` (step 0) to ``end`` (step ``warmup``), then constant ``end``."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


def ema_momentum(step: int, total: int, start: float, end: float, kind: str = "cosine") -> float:
    """Teacher EMA momentum at ``step`` of ``total``: cosine (DINO) or linear (I-JEPA) from ``start`` to ``end``."""
    if kind == "linear":
        return start + (end - start) * min(step / max(total - 1, 1), 1.0)
    return cosine_schedule(step, total, start, end)


def auto_momentum(total_steps: int) -> float:
    """Initial teacher momentum for ``optim.momentum_teacher=null``: the teacher's horizon
    1/(1-m) is about a tenth of the run, clamped to [0.95, 0.996] (0.996 = DINO's long runs)."""
    return float(min(0.996, max(0.95, 1.0 - 10.0 / max(total_steps, 1))))


def pair(v: list[float]) -> tuple[float, float]:
    """A config's ``[low, high]`` list as a tuple (the loader checked it has two entries)."""
    return float(v[0]), float(v[1])
