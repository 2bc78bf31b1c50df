"""Check a teacher's hypergradient against central differences of the validation loss, in float64.

:func:`check_hypergradient` runs a method of :data:`~metateach.registry.HYPERGRADS`
on float64 copies of a teacher and a student, takes its hypergradient
(:meth:`~metateach.engine.strategy.HypergradMethod.hypergradient`) and compares
it, parameter tensor by parameter tensor, with central differences of the
validation loss. The differences re-run the student's steps in plain PyTorch
(:mod:`metateach.hypergrad.replay`: the ``torch.optim`` optimizer the student's
update rule stands for, a forward pass, the teacher's lesson, ``backward``),
independently of the method and of the rule. What the
validation loss is a function of follows the method's
:class:`~metateach.engine.strategy.Differentiates`:

* ``WINDOW``: the span's K steps from the check's start, the teacher shifted
  in the last B of them (the first K - B are the same in every run);
* ``OPTIMUM``: the student trained again to the optimum of the training
  loss on one batch, from the optimum the check starts at;
* ``ROUNDS``: two rounds of K steps, the second under the lesson weights
  the teacher's learned optimizer writes from the first round's gradient,
  which is itself taken by central differences;
* ``SAMPLE_WEIGHTS``: one step on the eps-weighted loss, in each eps_k.

Unless the check keeps dw/dtheta (``keep_weight_grad``), the teacher sees,
in every run, the views of the unshifted run, detached: that is what
dw/dtheta = 0 means.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from metateach.data import Batch, as_batch
from metateach.engine.problem import BilevelProblem
from metateach.engine.strategy import Differentiates, PerStepMethod
from metateach.hypergrad.example_gradient import ExampleGradients
from metateach.hypergrad.implicit import REFUSAL as IMPLICIT_REFUSAL
from metateach.hypergrad.replay import (
    Objective,
    Objectives,
    Replay,
    SampleWeights,
    StudentSteps,
    central_difference,
)
from metateach.optim.optimizers import build_rule
from metateach.optim.rules import MomentumSGD, RuleOptimizer
from metateach.registry import HYPERGRADS
from metateach.student import Student
from metateach.teacher import (
    Teacher,
    TeachingContext,
)

__all__ = ["HypergradientCheck", "TensorCheck", "check_hypergradient"]

Pair = Batch | tuple[Tensor, Tensor]


@dataclass(frozen=True)
class TensorCheck:
    """One parameter tensor: the method's hypergradient and the central differences,
    at the coordinates checked (``len(hypergradient)`` of ``size``)."""

    name: str
    hypergradient: Tensor
    central_difference: Tensor
    size: int

    @property
    def abs_error(self) -> float:
        """The largest difference of a coordinate, max |hypergradient - central difference|."""
        return float((self.hypergradient - self.central_difference).abs().max())

    @property
    def rel_error(self) -> float:
        """||hypergradient - central difference|| / ||central difference|| (0 if both vanish)."""
        error = float((self.hypergradient - self.central_difference).norm())
        scale = float(self.central_difference.norm())
        if scale == 0:
            return 0.0 if error == 0 else math.inf
        return error / scale


@dataclass(frozen=True)
class HypergradientCheck:
    """What :func:`check_hypergradient` found: a :class:`TensorCheck` per trainable tensor.

    A tensor passes when its relative error is at most ``rtol``, or no
    coordinate is off by more than ``atol`` (the central differences'
    resolution, for a gradient that is zero or nearly: with h = 1e-6 and a
    validation loss near 1, rounding alone moves a difference by ~1e-10).
    """

    method: str
    differentiates: Differentiates
    tensors: tuple[TensorCheck, ...]
    rtol: float
    atol: float
    notes: tuple[str, ...] = ()

    def passes(self, tensor: TensorCheck) -> bool:
        return tensor.rel_error <= self.rtol or tensor.abs_error <= self.atol

    @property
    def passed(self) -> bool:
        return all(self.passes(t) for t in self.tensors)

    @property
    def max_rel_error(self) -> float:
        return max(t.rel_error for t in self.tensors)

    def __str__(self) -> str:
        width = max(len("tensor"), *(len(t.name) for t in self.tensors))
        lines = [
            f"{self.method} against central differences ({self.differentiates.value}): "
            + ("passed" if self.passed else "FAILED")
            + f" (rtol {self.rtol:g}, atol {self.atol:g})",
            f"{'tensor':<{width}}  {'checked':>9}  {'|hypergradient|':>15}  "
            f"{'|central diff.|':>15}  {'rel. error':>10}",
        ]
        for t in self.tensors:
            checked = f"{len(t.hypergradient)}/{t.size}"
            lines.append(
                f"{t.name:<{width}}  {checked:>9}  {float(t.hypergradient.norm()):15.6e}  "
                f"{float(t.central_difference.norm()):15.6e}  {t.rel_error:10.2e}"
                + ("" if self.passes(t) else "  <-")
            )
        return "\n".join(lines + list(self.notes))


def check_hypergradient(
    teacher: Teacher,
    student: Student,
    train: Pair | Sequence[Pair],
    val: Pair,
    method: str | None = None,
    *,
    inner_steps: int | None = None,
    backprop_steps: int | None = None,
    keep_weight_grad: bool | None = None,
    options: Mapping[str, Any] | None = None,
    lr: float | Sequence[float] = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    nesterov: bool = False,
    optimizer: str = "sgd",
    optimizer_settings: Mapping[str, Any] | None = None,
    warmup_steps: int = 2,
    optimum_steps: int = 300,
    step: float = 1e-6,
    coordinates: int | None = 64,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    seed: int = 0,
) -> HypergradientCheck:
    """Compare ``method``'s hypergradient for ``teacher`` with central differences, in float64.

    Nothing given is changed: the check works on float64 copies, on the
    CPU. The student starts where ``warmup_steps`` plain steps take it (0:
    the first step of training, with no momentum yet), then the method's
    span follows.

    Args:
        teacher: the teacher; it must learn by hypergradient (or, with no
            parameters, from each sample's: Learning-to-Reweight).
        student: the student.
        train: the training batch, or one per step (cycled): (inputs, labels)
            pairs or :class:`~metateach.data.Batch` es. Small: the differences
            re-run the steps twice per coordinate.
        val: the validation batch.
        method: a name in :data:`~metateach.registry.HYPERGRADS`; by default
            the teacher's own (with its K, B, options and ``keep_weight_grad``).
        inner_steps: K, the student steps of the span (default: the teacher's
            for its own method, else 1).
        backprop_steps: B, the last steps differentiated through (default: the
            teacher's for its own method, else 1).
        keep_weight_grad: let the lesson depend on the student's states
            (default: the teacher's declaration for its own method, else False).
        options: the method's own settings (``implicit``: its solver; for
            ``learned_optimizer`` the check takes ``rounds=1``, two rounds).
        lr: the student's learning rate, or one per step (warm-up included, cycled).
        momentum: the student's optimizer's momentum.
        weight_decay: its weight decay.
        nesterov: whether its momentum is Nesterov's.
        optimizer: the student's optimizer (``optim.name``: ``sgd``, ``adam``, ``adamw``, ...).
        optimizer_settings: its other settings (``betas``, ``eps``, ``kwargs``), as
            :func:`~metateach.optim.build_rule` takes them.
        warmup_steps: plain steps (cross-entropy, no teacher) before the span.
        optimum_steps: for ``implicit``: steps of training to the optimum, and
            of each re-training.
        step: the central differences' step h.
        coordinates: at most this many coordinates of each tensor are
            differenced (chosen at random, seeded); None: all.
        rtol: the relative tolerance of :attr:`HypergradientCheck.passed`.
        atol: its absolute tolerance, the differences' resolution.
        seed: the random state every run starts from (dropout draws alike).

    Raises:
        ValueError: the teacher does not learn by hypergradient, or the method
            cannot teach it (why), or ``implicit`` finds no optimum.
    """
    learning = teacher.learns
    try:
        method, method_class = learning.checked_method(method)
    except ValueError as e:
        raise ValueError(f"{type(teacher).__name__}: {e}") from None
    reason = method_class.refuses(teacher)
    if reason is not None:
        raise ValueError(f"{method} cannot teach {type(teacher).__name__}: {reason}")
    own = method == getattr(learning, "method", None)
    per_step = issubclass(method_class, PerStepMethod | ExampleGradients)
    kind = method_class.differentiates
    k = inner_steps or (learning.inner_steps if own and not per_step else 1)
    b = backprop_steps or (learning.backprop_steps if own and not per_step else 1)
    keep = keep_weight_grad if keep_weight_grad is not None else own and learning.keep_weight_grad
    given = dict(options or {})
    options = given if options is not None else dict(learning.options) if own else {}
    if kind is Differentiates.ROUNDS:
        if given.get("rounds", 1) != 1:
            raise ValueError("the check of learned_optimizer takes rounds=1: two rounds, one step")
        options["rounds"] = 1
    if kind is Differentiates.OPTIMUM and (k, b) != (1, 1):
        raise ValueError("implicit is checked at an optimum, one step: inner_steps=1")

    if kind is Differentiates.OPTIMUM:
        warmup_steps = 0  # the training to the optimum comes first instead

    caller_rng = torch.get_rng_state()
    try:
        # On the CPU in float64: the differences need the precision, and every run one random stream.
        teacher = copy.deepcopy(teacher.hypergradient_reference()).double().cpu()
        student = copy.deepcopy(student).double().cpu()
        batches = [_float64(b) for b in (train if _is_sequence(train) else [train])]
        val_batch = _float64(val)
        rates = list(lr) if isinstance(lr, Sequence) else [float(lr)]
        total = warmup_steps + (2 * k if kind is Differentiates.ROUNDS else k)
        steps = [batches[t % len(batches)] for t in range(total)]
        # A gradient norm that differs by step: a replay must show each step its own context.
        contexts = [
            TeachingContext(
                t, 0, total, torch.tensor(1.0, dtype=torch.float64), 0.5,
                grad_norm=torch.tensor(1.0 + 0.25 * t, dtype=torch.float64),
            )
            for t in range(total)
        ]  # fmt: skip
        rule = build_rule(
            optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            **dict(optimizer_settings or {}),
        )
        trainable = [p for p in student.parameters() if p.requires_grad]
        schedule = StudentSteps([rates[t % len(rates)] for t in range(total)], rule)
        notes = []
        if kind is Differentiates.OPTIMUM:
            # The optimum is the objective's (its coupled decay the rule's), whichever optimizer
            # walks there: momentum SGD walks there to the check's precision, and re-walks there
            # in the central differences.
            if rule.stationary_decay is None:
                raise ValueError(IMPLICIT_REFUSAL.format(name=rule.name))
            schedule = StudentSteps(schedule.rates, MomentumSGD(momentum, rule.stationary_decay))
        problem = BilevelProblem(
            student,
            RuleOptimizer(trainable, schedule.rule, schedule.rates[0]),
            teacher,
            val_stream=val_batch,
            keep_weight_grad=keep,
        )
        if kind is Differentiates.OPTIMUM:
            notes.append(_train_to_optimum(problem, steps[0], contexts[0], optimum_steps))
            problem.optimizer = RuleOptimizer(trainable, rule, schedule.rates[0])
        untaught = BilevelProblem(student, problem.optimizer)  # the warm-up's plain steps
        for t in range(warmup_steps):
            schedule.apply(problem.optimizer, t)
            untaught.real_step(steps[t], contexts[t])

        torch.manual_seed(seed)  # the method's span and every replay draw alike
        replay = Replay(student, problem.optimizer, schedule, val_batch, keep)
        built = (
            ExampleGradients(problem)
            if method_class is ExampleGradients
            else HYPERGRADS.build(
                method, options, "options", problem=problem, inner_steps=k, backprop_steps=b
            )
        )
        span = slice(warmup_steps, None)
        found = built.hypergradient(steps[span], contexts[span], schedule.rates[span])

        run = Objectives(replay, steps, contexts, k, b)
        differenced: nn.Module = teacher
        if kind is Differentiates.SAMPLE_WEIGHTS:
            differenced = SampleWeights(len(steps[warmup_steps].y))
            objective, coordinates = run.window(differenced, warmup_steps), None
        elif kind is Differentiates.OPTIMUM:
            objective = run.optimum(teacher, optimum_steps)
        elif kind is Differentiates.ROUNDS:
            objective = run.rounds(teacher, warmup_steps, step)
        else:
            objective = run.window(teacher, warmup_steps)
        numeric = _differences(differenced, objective, step, coordinates, seed)
    finally:
        torch.set_rng_state(caller_rng)
    tensors = tuple(
        TensorCheck(name, found[name].reshape(-1)[index], differences, found[name].numel())
        for name, (index, differences) in numeric.items()
    )
    return HypergradientCheck(method, kind, tensors, rtol, atol, tuple(notes))


def _differences(
    module: nn.Module, objective: Objective, h: float, coordinates: int | None, seed: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per trainable tensor of ``module``: the coordinates chosen and the central differences
    of ``objective`` in them (the module shifted in place, one coordinate at a time)."""
    generator = torch.Generator().manual_seed(seed)
    found = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        size = parameter.numel()
        index = torch.arange(size)
        if coordinates is not None and size > coordinates:
            index = torch.randperm(size, generator=generator)[:coordinates].sort().values
        value = parameter.detach().clone()

        def put(v: Tensor, p: nn.Parameter = parameter) -> None:
            with torch.no_grad():
                p.copy_(v)

        differences = torch.tensor(
            [central_difference(put, value, int(j), h, lambda: objective(module)) for j in index],
            dtype=torch.float64,
        )
        found[name] = (index, differences)
    return found


def _train_to_optimum(
    problem: BilevelProblem, batch: Batch, context: TeachingContext, steps: int
) -> str:
    """Train the student on ``batch`` for ``steps`` steps; refuse if that is no optimum."""
    for _ in range(steps):
        problem.real_step(batch, context)
    params = problem.params()
    loss = problem.train_loss(params, batch, context, real=False, teacher_grad=False).loss
    decay = problem.rule.stationary_decay
    grads = torch.autograd.grad(loss, list(params.values()))
    decayed = [g + decay * p.detach() for g, p in zip(grads, params.values(), strict=True)]
    norm = float(torch.cat([d.reshape(-1) for d in decayed]).norm())
    if not norm < 1e-9:
        raise ValueError(
            f"implicit's hypergradient is exact at an optimum only, and {steps} steps on the "
            f"check's batch left a training gradient of norm {norm:.2e}: raise optimum_steps, "
            "weight_decay or lr, or freeze the student's layers but the last (a convex problem)"
        )
    return f"the training gradient at the optimum: {norm:.1e}"


def _is_sequence(train: Pair | Sequence[Pair]) -> bool:
    """Whether ``train`` is a list of batches rather than one (inputs, labels) pair or Batch."""
    return not isinstance(train, Batch) and not (
        isinstance(train, tuple) and len(train) == 2 and isinstance(train[0], Tensor)
    )


def _float64(batch: Pair) -> Batch:
    """``batch`` on the CPU, its floating-point inputs in float64."""
    x, y, index = as_batch(batch)
    x = x.to("cpu", torch.float64) if x.is_floating_point() else x.cpu()
    return Batch(x, y.cpu(), index.cpu())
