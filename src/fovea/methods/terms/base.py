"""What every loss term of the self-distillation step sees, and the shape of a term.

A step computes the teacher's and the student's :class:`Outputs` once; each enabled term then turns
them into ``(loss, logs)``; the method's loss is the weighted sum of the terms in the order of
``fovea.methods.terms.TERMS``. A term is an ``nn.Module`` (its state, e.g. EMA centres or a frozen
snapshot, is saved with the method's checkpoint under ``terms.<name>.``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from fovea.config.schema import RunConfig
from fovea.losses.dino import DINOLoss
from fovea.losses.sinkhorn import sinkhorn_knopp
from fovea.methods.base import StepValues
from fovea.models.vit import VisionTransformer


@dataclass
class Outputs:
    """One network's outputs on the crops of a batch (B images).

    ``cls_logits``: per head level, [n_crops*B, K_m] (teacher: the 2 global crops; student: all crops);
    ``cls``: backbone CLS [n_crops*B, D]; ``patch_logits``: per level [M, K_p] at the masked positions
    (None without iBOT); ``patches``: backbone patch tokens of the 2 global crops [2B, Np, D].
    """

    cls_logits: list[Tensor]
    cls: Tensor
    patch_logits: list[Tensor] | None
    patches: Tensor


@dataclass
class StepInput:
    """The batch as the terms see it: normalised crops, iBOT masks [2B, Np] (or None) and, when the
    Gram teacher has its own larger crops, those (normalised, global crops 1 and 2)."""

    crops: list[Tensor]
    masks: Tensor | None
    gram_crops: list[Tensor] | None

    @property
    def n_images(self) -> int:
        return self.crops[0].shape[0]


@dataclass
class Parts:
    """What a term may build on: the config, the heads' levels and the teacher (for snapshots)."""

    cfg: RunConfig
    widths: list[int]  # backbone width of each head level (one level without Matryoshka)
    level_weights: list[float]
    cls_out_dims: list[int]  # prototypes of each level of the DINO head
    patch_out_dims: list[int]  # ... of the head the iBOT term uses
    teacher_backbone: VisionTransformer


class Term(nn.Module):
    """A named loss term: ``forward(student, teacher, x, sv) -> (loss, logs)``; ``weight(sv)`` its weight."""

    name: ClassVar[str]

    @staticmethod
    def enabled(cfg: RunConfig) -> bool:
        raise NotImplementedError

    def weight(self, sv: StepValues) -> float:
        raise NotImplementedError

    def forward(self, s: Outputs, t: Outputs, x: StepInput, sv: StepValues) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def after_step(self, teacher_backbone: VisionTransformer, sv: StepValues) -> None:
        """After the optimizer step and the EMA update (e.g. refresh a snapshot)."""


def teacher_targets(logits: Tensor, loss_fn: DINOLoss, centering: str, temp: float, iters: int,
                    n_total: Tensor | None = None) -> Tensor:
    """Teacher probabilities [N, K]: EMA-centred softmax, or Sinkhorn-Knopp over all ranks."""
    if centering == "sinkhorn":
        return sinkhorn_knopp(logits, temp, iters, n_total)
    return loss_fn.teacher_probs(logits, temp)


def sum_terms(terms: nn.ModuleDict, s: Outputs, t: Outputs, x: StepInput, sv: StepValues
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the enabled terms, in their order, with each term's logs, ``loss/<name>`` and
    ``loss/total``."""
    logs: dict[str, Tensor] = {}
    loss: Tensor | None = None
    for name, term in terms.items():
        assert isinstance(term, Term)
        value, term_logs = term(s, t, x, sv)
        logs.update(term_logs)
        logs[f"loss/{name}"] = value.detach()
        weighted = term.weight(sv) * value
        loss = weighted if loss is None else loss + weighted
    if loss is None:
        raise ValueError("no loss term is enabled")
    logs["loss/total"] = loss.detach()
    return loss, logs
