"""Step counts of a run, derived once from the config and the data set size (see ``fovea.train.plan``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Plan:
    """How long a run is, in steps. ``epoch_unit`` is the number of steps one schedule "epoch" lasts
    (one pass over the data, or ``optim.epoch_length`` steps: DINOv2 counts 1250-step epochs)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    checkpoint_every: int
    eval_every: int
    peak_lr: float
    epoch_unit: int

    def steps(self, epochs: float) -> int:
        """A duration in (schedule) epochs as a step count."""
        return int(round(epochs * self.epoch_unit))
