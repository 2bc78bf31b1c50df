"""The Teacher contract.

A teacher is an ``nn.Module`` that looks at a batch and at a view of the
student and returns a :class:`~metateach.lesson.Lesson`. It also declares
how it learns (``learns``, one of the declarations of :mod:`metateach.learning`:
``Hypergradient``, ``ExampleGradient``, ``PolicyGradient``, ``PeerLearning``,
``FixedRule``), so that the trainer drives every teacher through one loop.

Write a new teacher by subclassing :class:`Teacher`, implementing
:meth:`Teacher.forward`, and registering a builder with
``@TEACHERS.register("name")`` (see docs/writing-a-teacher.md).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from metateach.config import LOSS_AVERAGES
from metateach.data import Batch
from metateach.functional import scratch_buffers, student_forward
from metateach.learning import (
    ExampleGradient,
    FixedRule,
    Hypergradient,
    Learning,
    PeerLearning,
    PolicyGradient,
)
from metateach.lesson import Lesson
from metateach.types import StudentView, TeachingContext

if TYPE_CHECKING:
    from metateach.config import TeacherConfig

__all__ = [
    "Teacher",
    "PeerTeacher",
    "StudentView",
    "TeachingContext",
    "Hypergradient",
    "FixedRule",
    "ExampleGradient",
    "PolicyGradient",
    "PeerLearning",
    "Learning",
    "LearnedUpdates",
    "loss_averaging",
    "LOSS_AVERAGES",
]


class Teacher(nn.Module, metaclass=ABCMeta):
    """Gives the student a lesson for each batch.

    Subclasses implement :meth:`forward` and set ``learns`` to declare how
    they learn; a config's ``teacher.hypergrad`` section may change the
    declared settings.
    """

    learns: ClassVar[Learning] = FixedRule()
    #: How ``view.context.avg_train_loss`` averages the batch losses (:data:`LOSS_AVERAGES`);
    #: a config's ``teacher.loss_average`` may change it.
    loss_average: ClassVar[str] = "ema"
    #: State-dict names whose shape follows the number of classes: a teacher loaded from a
    #: checkpoint on a data set with another class count keeps these freshly initialized.
    per_class: ClassVar[tuple[str, ...]] = ()
    #: Whether its lessons set the optimizer's step (:class:`~metateach.lesson.StepSettings`):
    #: a method that cannot differentiate a step's settings refuses such a teacher.
    teaches_step: ClassVar[bool] = False

    @abstractmethod
    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        """The lesson for ``batch``, given what the student makes of it."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the teacher itself, logged with each epoch's metrics under ``teacher/``."""
        return {}

    def hypergradient_reference(self) -> Teacher:
        """The teacher whose lesson this one's hypergradient is the exact derivative of.

        :func:`~metateach.hypergrad.check.check_hypergradient` takes central
        differences of its lessons. That is the teacher itself, unless its
        lesson passes a surrogate gradient (a straight-through estimator,
        ``x - x.detach()``), which central differences of its own lessons
        cannot see: such a teacher returns a teacher with the same parameter
        names whose lessons are a function of them with that gradient at the
        current parameters.
        """
        return self


def loss_averaging(settings: TeacherConfig) -> str:
    """The configured teacher's ``loss_average``: ``teacher.loss_average``, else its declaration."""
    from metateach.registry import TEACHERS

    declared = getattr(TEACHERS.get(settings.name), "loss_average", Teacher.loss_average)
    return settings.loss_average or declared


class LearnedUpdates(metaclass=ABCMeta):
    """What a teacher offers to be taught by a learned optimizer
    (:class:`~metateach.hypergrad.learned_optimizer.LearnedOptimizer`, L2T-DLN's three levels).

    Its lesson depends on weights phi that are *state*, not trainable
    parameters (they are frozen: the teacher's optimizer never steps them);
    its trainable parameters are the learned optimizer's.
    """

    @abstractmethod
    def lesson_weights(self) -> dict[str, Tensor]:
        """phi as the lessons use it now (detached values)."""

    @abstractmethod
    def use_lesson_weights(self, weights: dict[str, Tensor]) -> None:
        """Make the lessons use ``weights`` (which may carry a graph) and store their values."""

    @abstractmethod
    def learned_update(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """The learned optimizer's update to phi for the gradient ``grads``; advances its memory.

        The update and the memory keep their graph to the optimizer's parameters.
        """

    @abstractmethod
    def truncate_memory(self) -> None:
        """Cut the memory's graph: backpropagation through time stops here."""


class PeerTeacher(Teacher):
    """A teacher that is a student too: a second network that selects for the student and learns from it.

    Subclasses build ``self.peer`` (a network for the same task, initialized
    on its own) and implement :meth:`select`, the rule by which either
    network picks, from its own per-sample losses, the samples the other
    learns from. Under :class:`PeerLearning` the strategy
    (:class:`~metateach.engine.peer.PeerTeaching`) runs both networks on
    each batch and exchanges their selections; :meth:`forward` is the
    student's side alone, for a frozen peer and for the diagnostics.
    """

    learns: ClassVar[Learning] = PeerLearning()
    peer: nn.Module

    @abstractmethod
    def select(self, losses: Tensor, context: TeachingContext) -> Tensor:
        """The boolean mask of samples one network offers the other, from its per-sample ``losses``."""

    def observe(self, index: Tensor, losses: Tensor, context: TeachingContext) -> None:
        """Called each step, before the selections, with the batch's losses (for rules that adapt)."""
        _ = index, losses, context

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        """The peer's selection on ``batch``: its forward pass as in training, BatchNorm statistics untouched."""
        params = dict(self.peer.named_parameters())
        with torch.no_grad():
            logits = student_forward(self.peer, params, batch.x, scratch_buffers(self.peer)).logits
        losses = torch.nn.functional.cross_entropy(logits, batch.y, reduction="none")
        return Lesson(mask=self.select(losses, view.context))
