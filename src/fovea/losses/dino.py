"""DINO CLS loss with EMA centering and sharpening (METHODS.md section 1; DINOv2 pairs, section 3)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher and student distributions.

    ``forward(student [S*B, K], teacher [T*B, K], teacher_temp)``: the student holds S crops and
    the teacher T global crops, each a block of B rows in the same image order. Averages
    H(P_t(i), P_s(j)) over all pairs (i, j) with i != j (same crop index = same view), i.e.
    T*S - T pairs (2*(2+L) - 2 for DINO). The centre is an EMA of the teacher's batch mean
    (over all ranks), updated by :meth:`update_center` after the loss (used from the next step). With
    gradient accumulation the micro-batches' teacher outputs are added up by :meth:`add_to_center` and
    the EMA is applied once per optimizer step by :meth:`apply_center`, so that the centre moves as it
    would with the whole batch at once.
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: tuple[Tensor, Tensor] | None = None  # (sum of teacher rows, count) since the last update

    def teacher_probs(self, teacher: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - c) / tau_t) in float32, [T*B, K]."""
        return F.softmax((teacher.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student: Tensor, teacher: Tensor, teacher_temp: float, n_global: int) -> Tensor:
        return cross_view_loss(student, self.teacher_probs(teacher, teacher_temp), n_global, self.student_temp)

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        """c <- m c + (1 - m) mean(teacher) over this batch on all ranks (no change if no rows anywhere)."""
        self.add_to_center(teacher)
        self.apply_center()

    @torch.no_grad()
    def add_to_center(self, teacher: Tensor) -> None:
        """Add this (micro-)batch's teacher rows to the pending centre update."""
        s = teacher.detach().float().sum(0, keepdim=True)
        n = torch.tensor([teacher.shape[0]], dtype=torch.float32, device=teacher.device)
        self._pending = (s, n) if self._pending is None else (self._pending[0] + s, self._pending[1] + n)

    @torch.no_grad()
    def apply_center(self) -> None:
        """c <- m c + (1 - m) mean of the pending rows over all ranks; a rank with none pending takes part
        with zeros (every rank calls this once per step)."""
        s, n = self._pending if self._pending is not None else (torch.zeros_like(self.center),
                                                                torch.zeros(1, device=self.center.device))
        self._pending = None
        if is_dist():
            dist.all_reduce(s)
            dist.all_reduce(n)
        if n.item() > 0:
            self.center.mul_(self.center_momentum).add_(s / n, alpha=1 - self.center_momentum)


def cross_view_loss(student: Tensor, teacher_probs: Tensor, n_global: int, student_temp: float) -> Tensor:
    """Mean over pairs (teacher global crop i, student crop j), i != j, of H(P_t(i), softmax(s_j / tau_s)).

    student: [S*B, K] (S crops, B rows each, same image order); teacher_probs: [T*B, K], T = n_global.
    With T = 2 the pairs are the crosswise global pair (both directions) and every (global, local)
    pair: 2 + 2L pairs, the DINO v1 and DINOv2 DINO term alike (18 for L = 8).
    """
    p_t = teacher_probs.chunk(n_global)
    log_s = F.log_softmax(student.float() / student_temp, dim=-1)
    n_crops = student.shape[0] // p_t[0].shape[0]
    log_s_crops = log_s.chunk(n_crops)
    total, n_pairs = student.new_zeros((), dtype=torch.float32), 0
    for i, pt in enumerate(p_t):
        for j, ls in enumerate(log_s_crops):
            if i == j:
                continue
            total = total - (pt * ls).sum(-1).mean()
            n_pairs += 1
    return total / n_pairs
