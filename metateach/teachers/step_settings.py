"""Teachers of the optimizer's own settings: a learned learning-rate schedule and learned weight decay.

L2T names three things a teacher controls: the data, the loss, and the
space the student searches. These teach the third through the optimizer:
their lessons hold :class:`~metateach.lesson.StepSettings` and no sample
weights, and every hypergradient route but ``implicit`` differentiates the
validation loss through the steps they set.

References:
    Maclaurin, Duvenaud and Adams, "Gradient-based hyperparameter
    optimization through reversible learning", ICML 2015 (learning-rate
    schedules and weight decay learned through reversed momentum SGD).
    Fan, Tian, Qin, Li and Liu, "Learning to teach", ICLR 2018.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson, StepSettings
from metateach.registry import TEACHERS
from metateach.student import Student
from metateach.teacher import Hypergradient, StudentView, Teacher

__all__ = ["LearningRateSchedule", "LearningRateController", "LearnedWeightDecay", "knot_curve"]


def knot_curve(values: Tensor, progress: float) -> Tensor:
    """The piecewise-linear curve through ``values`` at evenly spaced knots over [0, 1], at ``progress``."""
    n = values.shape[0]
    if n == 1:
        return values[0]
    position = min(max(progress, 0.0), 1.0) * (n - 1)
    left = min(int(math.floor(position)), n - 2)
    frac = position - left
    return values[left] * (1 - frac) + values[left + 1] * frac


@TEACHERS.register("lr_schedule")
class LearningRateSchedule(Teacher):
    """A learned learning-rate curve over the run: the schedule's rate times exp(c(progress)).

    c is piecewise linear in the run's progress (step / total steps) through
    ``knots`` evenly spaced values, all 0 to start (the configured schedule
    unchanged), so the log of the scale is learned: the scale stays positive
    and a step of the teacher's optimizer moves it by a factor, not an amount.
    Each lesson's step settings carry that scale; the samples keep weight one.

    Args:
        knots: values of the curve (2: a learned linear change of the log-rate;
            Maclaurin et al. learned one rate per step).
    """

    learns = Hypergradient("reversible", inner_steps=20, backprop_steps=20)
    teaches_step = True

    def __init__(self, knots: int = 10) -> None:
        super().__init__()
        if knots < 1:
            raise ValueError(f"teacher.kwargs.knots must be >= 1, got {knots}")
        self.log_scale = nn.Parameter(torch.zeros(knots))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(step=StepSettings(lr_scale=self.scale_at(view.context.progress)))

    def scale_at(self, progress: float) -> Tensor:
        """The learning rate's scale at ``progress`` in [0, 1] of the run."""
        return knot_curve(self.log_scale, progress).exp()

    def metrics(self) -> dict[str, float]:
        """The scale at each knot (``lr_scale/knot_00`` at the start of the run, ... at its end)."""
        scales = self.log_scale.detach().exp()
        return {f"lr_scale/knot_{i:02d}": float(v) for i, v in enumerate(scales)}


@TEACHERS.register("lr_controller")
class LearningRateController(Teacher):
    """A step size set from the student's state: the schedule's rate times exp(f(s)), f a small network.

    s holds what the student's training shows so far (``StudentView`` and its
    context):

    - the run's progress, step / total steps;
    - the average training loss so far (``teacher.loss_average``);
    - the best validation accuracy so far;
    - this batch's mean loss;
    - the norm of the gradient the last real step took (0 before the first).

    Losses and the norm enter as log(1 + x). f is a hidden layer of ``hidden``
    tanh units and one output, the output's weights zero to start: the
    configured schedule unchanged. The log-scale is bounded smoothly,
    m tanh(f / m) with m = log(``max_scale``), so no state can set a rate
    more than ``max_scale`` times the schedule's or less than its inverse.

    The state is an input the teacher reads, not a function it
    differentiates: the hypergradient holds the history and the gradient norm
    fixed, as every teacher's context is (the batch losses are detached from
    the student's parameters, the deep-interaction paper's dw/dtheta = 0).

    Args:
        hidden: units of the hidden layer.
        max_scale: the largest factor on the schedule's rate (> 1).
    """

    learns = Hypergradient("reversible", inner_steps=20, backprop_steps=20)
    teaches_step = True

    #: The state's entries, in the order the network reads them.
    inputs = ("progress", "avg_train_loss", "best_val_acc", "batch_loss", "grad_norm")

    def __init__(self, hidden: int = 16, max_scale: float = 10.0) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"teacher.kwargs.hidden must be >= 1, got {hidden}")
        if not max_scale > 1:
            raise ValueError(f"teacher.kwargs.max_scale must be > 1, got {max_scale}")
        self.bound = math.log(max_scale)
        self.net = nn.Sequential(
            nn.Linear(len(self.inputs), hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def state(self, view: StudentView) -> Tensor:
        """s for ``view``: :attr:`inputs` in order, in the teacher's dtype and device."""
        weight = self.net[0].weight
        context = view.context
        progress, avg_loss, best_acc = context.history(weight.dtype, weight.device)
        batch_loss = view.losses.detach().mean().to(device=weight.device, dtype=weight.dtype)
        grad_norm = (
            torch.zeros((), dtype=weight.dtype, device=weight.device)
            if context.grad_norm is None
            else context.grad_norm.detach().to(device=weight.device, dtype=weight.dtype)
        )
        return torch.stack(
            [progress, avg_loss.log1p(), best_acc, batch_loss.log1p(), grad_norm.log1p()]
        )

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(step=StepSettings(lr_scale=self.scale(self.state(view))))

    def scale(self, state: Tensor) -> Tensor:
        """The factor on the schedule's rate in ``state`` (:meth:`state`)."""
        out = self.net(state).squeeze(-1)
        return (self.bound * torch.tanh(out / self.bound)).exp()


#: How :class:`LearnedWeightDecay` groups the student's parameters.
Grouping = Literal["layer", "kind", "all"]


def parameter_groups(student: nn.Module, by: Grouping) -> dict[str, list[str]]:
    """The student's trainable parameters by group, in their order: by ``layer`` (the module
    that holds them), by ``kind`` (``weights``: matrices and kernels; ``other``: biases and
    norms' scales), or ``all`` in one."""
    groups: dict[str, list[str]] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if by == "layer":
            key = name.rpartition(".")[0] or name
        elif by == "kind":
            key = "weights" if p.dim() > 1 else "other"
        elif by == "all":
            key = "all"
        else:
            raise ValueError(f"teacher.kwargs.groups must be layer, kind or all, got {by!r}")
        groups.setdefault(key, []).append(name)
    return groups


@TEACHERS.register("weight_decay")
class LearnedWeightDecay(Teacher):
    """Learned weight decay, one value a group of the student's parameters.

    Each group's decay is exp(a_g), a_g learned, starting at ``initial`` for
    every group. The lessons' step settings give every parameter its group's
    decay, in place of ``optim.weight_decay`` (coupled, or decoupled under
    AdamW, as the optimizer's own is).

    Args:
        student: the student whose parameters are grouped.
        groups: ``layer`` (each module with parameters of its own), ``kind``
            (weights apart from biases and norms), or ``all``.
        initial: every group's decay to start with (> 0).
    """

    learns = Hypergradient("reversible", inner_steps=20, backprop_steps=20)
    teaches_step = True

    def __init__(self, student: Student, groups: Grouping = "layer", initial: float = 5e-4) -> None:
        super().__init__()
        if not initial > 0:
            raise ValueError(
                f"teacher.kwargs.initial must be > 0 (a decay's log is learned), got {initial}"
            )
        self.groups = parameter_groups(student, groups)
        self.log_decay = nn.Parameter(torch.full((len(self.groups),), math.log(initial)))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        decays = self.log_decay.exp()
        by_name = {
            name: decays[i] for i, members in enumerate(self.groups.values()) for name in members
        }
        return Lesson(step=StepSettings(weight_decay=by_name))

    def metrics(self) -> dict[str, float]:
        decays = self.log_decay.detach().exp()
        return {f"weight_decay/{g}": float(d) for g, d in zip(self.groups, decays, strict=True)}
