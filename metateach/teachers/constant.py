"""Every sample weighs one: plain training, through the teacher machinery."""

from __future__ import annotations

import torch
from torch import nn

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
    fixed rule.
    """

    learns = Hypergradient("lookahead")

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(()))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        one = torch.exp(self.beta - self.beta.detach())
        return Lesson(weights=one.to(view.losses.dtype).expand(view.losses.shape[0]))
