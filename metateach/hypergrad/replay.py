"""The student's steps re-run in plain PyTorch, for :func:`~metateach.hypergrad.check.check_hypergradient`.

Nothing here shares code with the hypergradient methods: a step is the
student module's forward pass, the teacher's lesson on its view,
:func:`~metateach.lesson.lesson_loss`, ``backward`` and the ``torch.optim``
optimizer the student's update rule stands for (``torch.optim.SGD``,
``torch.optim.Adam``, ...; :meth:`~metateach.optim.rules.UpdateRule.reference`),
as a training loop is written by hand. :class:`Objectives` are the
validation loss after such steps, as a function of the teacher, for each
kind of method; the check takes their central differences.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson, StepSettings, lesson_loss
from metateach.optim.rules import UpdateRule, reference_copy
from metateach.optim.schedules import set_lr
from metateach.student import Student
from metateach.teacher import LearnedUpdates, StudentView, Teacher, TeachingContext

__all__ = [
    "Objective",
    "Objectives",
    "Replay",
    "SampleWeights",
    "StudentSteps",
    "central_difference",
]


@dataclass(frozen=True)
class StudentSteps:
    """The student's optimizer: a learning rate for each step, and its update rule."""

    rates: Sequence[float]
    rule: UpdateRule

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> None:
        """Set ``optimizer``'s learning rate to step ``t``'s."""
        set_lr(optimizer, self.rates[t])


class SampleWeights(nn.Module):
    """A stand-in teacher whose lesson is its parameter, one weight a sample (zero to start).

    The validation loss's central differences in it are Learning-to-Reweight's
    example gradients, d L_val / d eps at eps = 0.
    """

    def __init__(self, n: int) -> None:
        super().__init__()
        self.sample_weights = nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(weights=self.sample_weights)


class Replay:
    """A copy of the student and its optimizer that re-runs steps from a remembered state.

    Args:
        student: the student as the check's span starts (copied).
        optimizer: its optimizer, whose state (momentum, moments, ...) is copied: it
            is kept in ``torch.optim``'s layout.
        schedule: the optimizer's rule and learning rates.
        val: the validation batch.
        keep_weight_grad: the teacher sees the student's live states;
            otherwise they are detached.

    The random state as it is when the replay is made is the span's start's.
    """

    def __init__(
        self,
        student: Student,
        optimizer: torch.optim.Optimizer,
        schedule: StudentSteps,
        val: Batch,
        keep_weight_grad: bool,
    ) -> None:
        self.student = copy.deepcopy(student)
        named = [(k, p) for k, p in self.student.named_parameters() if p.requires_grad]
        self.names = [k for k, _ in named]
        self.params = [p for _, p in named]
        # A parameter group each, so that a lesson's weight decay can differ by parameter.
        self.optimizer = reference_copy(
            schedule.rule, [{"params": [p]} for p in self.params], schedule.rates[0], optimizer
        )
        #: The settings each group was built with, which a lesson's step settings replace for one step.
        self._built = [dict(g) for g in self.optimizer.param_groups]
        self.schedule = schedule
        self.val = val
        self.keep_weight_grad = keep_weight_grad
        self._mark = self._state()

    def remember(self) -> None:
        """Remember the state now (student, momentum, random state) for :meth:`recall`."""
        self._mark = self._state()

    def recall(self) -> None:
        """Back to the state :meth:`remember` saw last (at first, the span's start)."""
        self._load(self._mark)

    def step(
        self,
        teacher: nn.Module,
        batch: Batch,
        context: TeachingContext,
        t: int,
        view: StudentView | None = None,
    ) -> StudentView:
        """One optimizer step at step ``t``'s learning rate under ``teacher``'s lesson.

        The teacher sees ``view`` if one is given, else the step's own
        (detached unless ``keep_weight_grad``). Returns the view it saw, detached.
        """
        self.schedule.apply(self.optimizer, t)
        states = self.student(batch.x, return_states=True)
        losses = F.cross_entropy(states.logits, batch.y, reduction="none")
        live = StudentView(states.logits, losses, states.features, tuple(states.maps), context)
        if view is None:
            view = live if self.keep_weight_grad else _detached(live)
        lesson = teacher(batch, view)
        loss = lesson_loss(lesson, states, batch.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=self.params)  # the student's gradient only
        self._set_step(lesson.step)
        self.optimizer.step()
        return _detached(view)

    def _set_step(self, settings: StepSettings | None) -> None:
        """The groups' settings for this step: the optimizer's, with a lesson's ``settings`` applied."""
        settings = None if settings is None else settings.detached()
        for name, group, built in zip(
            self.names, self.optimizer.param_groups, self._built, strict=True
        ):
            group["weight_decay"] = built["weight_decay"]
            if "momentum" in built:
                group["momentum"] = built["momentum"]
            if settings is None:
                continue
            if settings.lr_scale is not None:
                group["lr"] = group["lr"] * float(settings.lr_scale)
            if settings.weight_decay is not None and name in settings.weight_decay:
                group["weight_decay"] = float(settings.weight_decay[name])
            if settings.momentum is not None:
                group["momentum"] = float(settings.momentum)

    def steps(
        self,
        teacher: nn.Module,
        batches: Sequence[Batch],
        contexts: Sequence[TeachingContext],
        span: Iterable[int],
    ) -> None:
        """Steps ``span`` (indices into ``batches`` and ``contexts``) under ``teacher``'s lessons."""
        for t in span:
            self.step(teacher, batches[t], contexts[t], t)

    @torch.no_grad()
    def val_loss(self) -> float:
        """The mean cross-entropy on the validation batch (BatchNorm with its statistics)."""
        return float(F.cross_entropy(self.student(self.val.x), self.val.y))

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Any], Tensor]:
        return (
            {k: v.clone() for k, v in self.student.state_dict().items()},
            copy.deepcopy(self.optimizer.state_dict()),
            torch.get_rng_state(),
        )

    def _load(self, state: tuple[dict[str, Tensor], dict[str, Any], Tensor]) -> None:
        student, optimizer, rng = state
        self.student.load_state_dict(student)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer))
        torch.set_rng_state(rng)


def _detached(view: StudentView) -> StudentView:
    return view._replace(
        logits=view.logits.detach(),
        losses=view.losses.detach(),
        features=view.features.detach(),
        maps=tuple(m.detach() for m in view.maps),
    )


#: The validation loss after the student's steps, for the teacher given (a shifted copy).
Objective = Callable[[nn.Module], float]


@dataclass
class Objectives:
    """The functions of the teacher whose central differences a check takes, one for each kind of method.

    Each starts from the replay's remembered state; steps are indices into
    ``steps`` and ``contexts`` (and the replay's learning rates).
    """

    replay: Replay
    steps: list[Batch]
    contexts: list[TeachingContext]
    k: int
    b: int

    def window(self, teacher: nn.Module, start: int) -> Objective:
        """L_val after K steps from ``start``; the teacher given teaches the last B, ``teacher`` the others."""
        base = copy.deepcopy(teacher)
        frozen = self._base_views(base, range(start, start + self.k))
        first = start + self.k - self.b

        def objective(shifted: nn.Module) -> float:
            self.replay.recall()
            for t in range(start, start + self.k):
                view = None if frozen is None else frozen[t - start]
                which = shifted if t >= first else base
                self.replay.step(which, self.steps[t], self.contexts[t], t, view)
            return self.replay.val_loss()

        return objective

    def optimum(self, teacher: nn.Module, steps: int) -> Objective:
        """L_val at the optimum of the training loss on the first batch, trained to again from the start."""
        frozen = self._base_views(teacher, [0])

        def objective(shifted: nn.Module) -> float:
            self.replay.recall()
            for _ in range(steps):
                view = None if frozen is None else frozen[0]
                self.replay.step(shifted, self.steps[0], self.contexts[0], 0, view)
            return self.replay.val_loss()

        return objective

    def rounds(self, teacher: Teacher, start: int, h: float) -> Objective:
        """L_val after the second of two rounds of K steps from ``start``, under the lesson
        weights the learned optimizer wrote from the first round's gradient in them, which
        central differences give. The teacher given differs from ``teacher`` in its learned
        optimizer's parameters alone."""
        assert isinstance(teacher, LearnedUpdates)
        lesson = {n: v.clone() for n, v in teacher.lesson_weights().items()}
        state = {n: v.clone() for n, v in teacher.state_dict().items()}
        first_round = self.window(teacher, start)
        shifted = copy.deepcopy(teacher)
        gradient = {}
        for name, value in lesson.items():

            def put(v: Tensor, name: str = name) -> None:
                shifted.use_lesson_weights({**lesson, name: v})

            differences = [
                central_difference(put, value, j, h, lambda: first_round(shifted))
                for j in range(value.numel())
            ]
            gradient[name] = torch.tensor(differences, dtype=torch.float64).view(value.shape)
        # The second round starts where the first took the student under ``teacher``.
        self.replay.recall()
        self.replay.steps(teacher, self.steps, self.contexts, range(start, start + self.k))
        self.replay.remember()

        def rewritten(module: Teacher) -> Teacher:
            """``module`` at the second round: the lesson weights moved by its learned update."""
            assert isinstance(module, LearnedUpdates)
            module.load_state_dict({**state, **_trainable(module)})
            with torch.no_grad():
                update = module.learned_update(gradient)
                module.use_lesson_weights({n: v + update[n] for n, v in lesson.items()})
            return module

        second_round = self.window(rewritten(copy.deepcopy(teacher)), start + self.k)
        return lambda shifted: second_round(rewritten(shifted))

    def _base_views(self, teacher: nn.Module, span: Iterable[int]) -> list[StudentView] | None:
        """The views the unshifted run shows the teacher over ``span`` (detached), which every
        run shows it unless dw/dtheta is kept; the replay is left as it was."""
        if self.replay.keep_weight_grad:
            return None
        self.replay.recall()
        views = [self.replay.step(teacher, self.steps[t], self.contexts[t], t) for t in span]
        self.replay.recall()
        return views


def _trainable(module: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def central_difference(
    put: Callable[[Tensor], None], value: Tensor, j: int, h: float, f: Callable[[], float]
) -> float:
    """(f(x + h e_j) - f(x - h e_j)) / (the step actually taken), x = ``value`` set by ``put``."""
    results, points = [], []
    for sign in (1.0, -1.0):
        moved = value.clone()
        moved.view(-1)[j] += sign * h
        points.append(float(moved.view(-1)[j]))
        put(moved)
        results.append(f())
    put(value)
    return (results[0] - results[1]) / (points[0] - points[1])
