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
