"""The KoLeo term (METHODS.md section 3): spread the student's backbone CLS of each global crop."""
from __future__ import annotations

from torch import Tensor

from fovea.config.schema import RunConfig
from fovea.losses.koleo import koleo_loss
from fovea.methods.base import StepValues
from fovea.methods.terms.base import Outputs, Parts, StepInput, Term


class KoLeoTerm(Term):
    name = "koleo"

    @staticmethod
    def enabled(cfg: RunConfig) -> bool:
        return cfg.koleo.weight > 0

    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.cfg = parts.cfg

    def weight(self, sv: StepValues) -> float:
        return self.cfg.koleo.weight

    def forward(self, s: Outputs, t: Outputs, x: StepInput, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        g1, g2 = s.cls[:2 * x.n_images].chunk(2)
        return koleo_loss(g1) + koleo_loss(g2), {}
