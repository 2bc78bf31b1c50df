"""Every sample weighs one: plain training, through the teacher machinery."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import Hypergradient, StudentView, Teacher

__all__ = ["ConstantTeacher"]


@TEACHERS.register("constant")
class ConstantTeacher(Teacher):
    """The all-ones teacher, with a parameter that learns but never changes a weight.

    Each weight is exp(beta - beta.detach()): exactly 1.0, yet with gradient 1
    with respect to beta. A hypergradient method therefore runs in full (the
    teacher's gradient is the sum of what each weight would receive) while
    the student trains exactly as it would with no teacher. It is the
    baseline a learned teacher is measured against, and the engine's probe:
    the tests check that every method leaves the student's training bit for
    bit as plain training leaves it. ``teacher.learn=false`` makes it a
    fixed rule. Its gradient is a straight-through one; it names the function
    whose derivative that is (:meth:`hypergradient_reference`).
    """

    learns = Hypergradient("lookahead")

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return _ones(self.beta, self.beta.detach(), view)

    def hypergradient_reference(self) -> Teacher:
        """Weights exp(beta - beta_now) with beta_now held at beta's value: the same weights
        (one) and, at beta_now, the same gradient, as a function central differences can see."""
        return _AnchoredOnes(self.beta)


class _AnchoredOnes(Teacher):
    """Weights exp(beta - anchor) for a fixed anchor: :class:`ConstantTeacher`'s gradient, honestly."""

    def __init__(self, beta: Tensor) -> None:
        super().__init__()
        self.beta = nn.Parameter(beta.detach().clone())
        self.register_buffer("anchor", beta.detach().clone())

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return _ones(self.beta, self.anchor, view)


def _ones(beta: Tensor, anchor: Tensor, view: StudentView) -> Lesson:
    """One weight exp(beta - anchor) for every sample of the view."""
    weight = torch.exp(beta - anchor)
    return Lesson(weights=weight.to(view.losses.dtype).expand(view.losses.shape[0]))
