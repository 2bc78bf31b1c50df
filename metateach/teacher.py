"""The Teacher contract.

A teacher is an ``nn.Module`` that looks at a batch and at a view of the
student and returns a :class:`~metateach.lesson.Lesson`. It also declares
how it learns, so that the trainer can drive every teacher through one loop:

* :class:`Hypergradient`: its parameters follow the gradient of the
  student's validation loss, computed by a method of
  :mod:`metateach.hypergrad` (which one, and its settings);
* :class:`ExampleGradient`: it has no parameters and reads its lesson off
  the validation loss's gradient with respect to each sample's weight;
* :class:`PolicyGradient`: it samples its lessons and is reinforced by a
  reward for the whole run (L2T's data filter);
* :class:`PeerLearning`: it is a second student that learns the task too,
  from the lesson the student gives it back (co-teaching, SRIT);
* :class:`FixedRule`: it has nothing to learn (focal loss, self-paced
  learning, a random filter).

Write a new teacher by subclassing :class:`Teacher`, implementing
:meth:`Teacher.forward`, and registering a builder with
``@TEACHERS.register("name")`` (see docs/writing-a-teacher.md).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from metateach.data import Batch
from metateach.errors import ConfigError
from metateach.lesson import Lesson

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
    "effective_learning",
    "loss_averaging",
    "LOSS_AVERAGES",
]


class TeachingContext(NamedTuple):
    """Where the student is in its training, as the trainer knows it."""

    step: int  # student steps taken before this batch
    epoch: int  # the epoch in progress, from 0
    total_steps: int  # steps the whole run will take
    #: The batch losses' average so far, a 0-dim tensor: their mean since the student's
    #: first step, or an exponential average (see :data:`LOSS_AVERAGES`).
    avg_train_loss: Tensor
    best_val_acc: float  # best validation accuracy so far (0 before the first evaluation)
    episode: int = 0  # which student of the run (train.episodes), from 0

    @property
    def progress(self) -> float:
        """The normalized iteration, step / total steps, in [0, 1]."""
        return self.step / max(self.total_steps, 1)

    def history(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """[normalized iteration, average training loss, best validation accuracy]: the student's history."""
        return torch.stack(
            [
                torch.as_tensor(self.progress, dtype=dtype, device=device),
                self.avg_train_loss.to(device=device, dtype=dtype),
                torch.as_tensor(self.best_val_acc, dtype=dtype, device=device),
            ]
        )


class StudentView(NamedTuple):
    """What a teacher may look at: the student's forward pass on the batch, and its history.

    ``features`` is the second-to-last layer (the deep-interaction paper's
    I0) and ``maps`` the stages' outputs, shallow to deep. Unless the
    teacher learns with ``keep_weight_grad``, these tensors are detached
    from the student's parameters (the paper's dw/dtheta = 0).
    """

    logits: Tensor
    losses: Tensor  # per-sample cross-entropy on the labels the student is given
    features: Tensor
    maps: tuple[Tensor, ...]
    context: TeachingContext
    #: For teachers that declare :class:`ExampleGradient`: d L_val / d eps_k, the
    #: validation loss's sensitivity to each sample's weight after one step.
    example_grad: Tensor | None = None


@dataclass(frozen=True)
class Hypergradient:
    """Learn by the gradient of the validation loss through the student's optimizer.

    Args:
        method: a name in :data:`metateach.registry.HYPERGRADS` (``unrolled``,
            ``reversible``, ``lookahead``, ``finite_difference``, ``implicit``,
            ``learned_optimizer``).
        inner_steps: K, student steps per teacher step.
        backprop_steps: B <= K, the steps the hypergradient looks back through.
        keep_weight_grad: let gradients flow through the lesson's dependence on
            the student's parameters (the deep-interaction paper's "deeper
            interaction"); off, the teacher sees detached states.
        options: the method's own settings (e.g. ``{solver: cg}`` for ``implicit``).
    """

    method: str = "lookahead"
    inner_steps: int = 1
    backprop_steps: int = 1
    keep_weight_grad: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def updated(self, **changes: Any) -> Hypergradient:
        """A copy with the settings in ``changes`` that are not None."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class PolicyGradient:
    """Learn by REINFORCE: a run's reward reinforces the teacher's random choices in it.

    At the end of a run (an episode) the teacher's
    :meth:`Teacher.episode_reward` scores it, and the teacher steps on
    -(r - b) * S, with b a moving average of past rewards (decay
    ``baseline_decay``) and S the score of the run's exploration:

    * ``exploration="actions"`` (L2T): each lesson is sampled and carries
      its ``log_prob``; S = sum_t grad log pi(lesson_t).
    * ``exploration="parameters"`` (PGPE, Sehnke et al. 2010): each run the
      teacher acts with its parameters theta + eps, eps ~ N(0, noise_std^2),
      and S = eps / noise_std^2, the score of that draw. The randomness is
      one draw per run instead of one per decision, so the estimate's
      variance does not grow with the run's tens of thousands of decisions.
      With ``mirrored``, runs come in pairs with +eps and -eps. A checkpoint
      taken mid-episode holds the teacher at theta + eps (and theta in the
      strategy's state); the one at the end of a run holds theta.

    A config's ``teacher.hypergrad.options`` may set these fields.
    """

    baseline_decay: float = 0.9
    exploration: str = "actions"
    noise_std: float = 0.1
    mirrored: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.exploration not in ("actions", "parameters"):
            raise ValueError(
                f"exploration must be 'actions' or 'parameters', got {self.exploration!r}"
            )
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {self.noise_std}")


@dataclass(frozen=True)
class ExampleGradient:
    """No parameters of its own: the lesson is read off the hypergradient of each sample's weight.

    Before each student step the engine takes one virtual step on the
    eps-weighted loss sum_k eps_k l_k, evaluates the validation loss after
    it, and hands the teacher d L_val / d eps at eps = 0 in
    ``view.example_grad`` (Learning-to-Reweight, Ren et al. 2018).
    """


@dataclass(frozen=True)
class PeerLearning:
    """A peer student: it learns the task with the student's optimizer, from the student's lessons.

    Each step both networks see the batch; each selects for the other
    (:meth:`Teacher.forward` gives the student the peer's selection, and the
    peer learns from the student's by :meth:`PeerTeacher.select`). The peer
    takes its steps with an optimizer built from the run's ``optim`` (SAM
    included) and follows the student's learning-rate schedule.
    """


@dataclass(frozen=True)
class FixedRule:
    """Nothing to learn: the lesson follows a fixed rule."""


Learning = Hypergradient | ExampleGradient | PolicyGradient | PeerLearning | FixedRule


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

    def episode_reward(
        self, history: Sequence[Mapping[str, float]], context: TeachingContext
    ) -> float:
        """A policy-gradient teacher's score for a finished run.

        ``history`` holds its per-epoch records; ``context`` says where it ended
        (``context.step`` of ``context.total_steps``).
        """
        raise NotImplementedError(
            f"{type(self).__name__} learns by policy gradient but defines no episode_reward()"
        )


#: How :attr:`TeachingContext.avg_train_loss` averages the batch losses.
LOSS_AVERAGES = {
    "mean": "the mean of every batch loss since the student's first step",
    "ema": "an exponential moving average, 0.9 old + 0.1 new (the first loss to start)",
}


def loss_averaging(settings: TeacherConfig) -> str:
    """The configured teacher's ``loss_average``: ``teacher.loss_average``, else its declaration."""
    from metateach.registry import TEACHERS

    declared = getattr(TEACHERS.get(settings.name), "loss_average", Teacher.loss_average)
    return settings.loss_average or declared


def effective_learning(settings: TeacherConfig) -> Learning:
    """How the configured teacher learns: its declaration, adjusted by ``teacher.hypergrad``.

    ``teacher.learn=false`` freezes any teacher into a fixed rule.
    """
    from metateach.registry import TEACHERS, check_options

    declared = getattr(TEACHERS.get(settings.name), "learns", FixedRule())
    if not settings.learn or isinstance(declared, FixedRule):
        return FixedRule()
    if isinstance(declared, PolicyGradient):
        options = settings.hypergrad.options
        what = f"policy-gradient teacher {settings.name!r}"
        check_options(PolicyGradient, options, what, "teacher.hypergrad.options")
        try:
            return replace(declared, **options)
        except ValueError as e:
            raise ConfigError(f"teacher.hypergrad.options of {what}: {e}") from None
    if isinstance(declared, ExampleGradient | PeerLearning):
        return declared
    asked = settings.hypergrad
    # The declared options belong to the declared method; another method starts from none.
    other_method = asked.method is not None and asked.method != declared.method
    return declared.updated(
        method=asked.method,
        inner_steps=asked.inner_steps,
        backprop_steps=asked.backprop_steps,
        keep_weight_grad=asked.keep_weight_grad,
        options=dict(asked.options) or ({} if other_method else None),
    )


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
    (:class:`~metateach.hypergrad.peer.PeerTeaching`) runs both networks on
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
        # Imported here: the hypergrad package imports this module.
        from metateach.hypergrad.functional import scratch_buffers, student_forward

        params = dict(self.peer.named_parameters())
        with torch.no_grad():
            logits = student_forward(self.peer, params, batch.x, scratch_buffers(self.peer)).logits
        losses = torch.nn.functional.cross_entropy(logits, batch.y, reduction="none")
        return Lesson(mask=self.select(losses, view.context))
