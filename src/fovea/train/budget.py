"""``train.budget_minutes``: the arithmetic of a run sized to a time budget, and the length a resumed run keeps.
The speed probe itself is :func:`fovea.train.loop.fit_budget` (it needs a trainer)."""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from fovea.errors import ConfigError
from fovea.train.runfolder import last_checkpoints, step_checkpoints

__all__ = ["budget_steps", "resumed_length"]


def budget_steps(minutes: float, probe_seconds: float, images_per_s: float, global_batch: int) -> int:
    """Optimizer steps that fill what is left of ``minutes`` after the probe's ``probe_seconds`` at
    ``images_per_s`` (whole steps, rounded down; at least one)."""
    left = minutes * 60 - probe_seconds
    if left <= 0:
        raise ConfigError(f"train.budget_minutes={minutes:g} is used up by the speed probe ({probe_seconds:.0f} s): "
                          "give a longer budget or fewer train.budget_probe_steps")
    return max(1, math.floor(left * images_per_s / global_batch))


def resumed_length(out: Path) -> int | None:
    """``optim.max_steps`` of the run in ``out`` when it has a checkpoint to resume from (from its
    ``config.yaml``, which every session writes resolved); None for a run that has not started."""
    ckpts = out / "checkpoints"
    cfg_file = out / "config.yaml"
    if not (last_checkpoints(ckpts) or step_checkpoints(ckpts)) or not cfg_file.is_file():
        return None
    steps = (yaml.safe_load(cfg_file.read_text()) or {}).get("optim", {}).get("max_steps")
    return int(steps) if steps else None
