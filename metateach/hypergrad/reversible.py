"""Reverse-mode hypergradients in constant memory by running momentum SGD backwards.

References:
    Fan et al., "Learning to Teach with Deep Interactions", 2020, Algorithm 1.
    Maclaurin, Duvenaud and Adams, "Gradient-based hyperparameter
    optimization through reversible learning", ICML 2015.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.distributed import holds_constant_terms, sum_gradients
from metateach.engine.forward_mode import mixed_gradient
from metateach.engine.meter import UpdateMeter
from metateach.engine.phases import phase, timed
from metateach.engine.problem import BilevelProblem
from metateach.engine.second_order import second_order
from metateach.engine.strategy import HypergradMethod
from metateach.engine.tangent import ForwardRecord, recording
from metateach.functional import dot
from metateach.lesson import Lesson, StepSettings
from metateach.optim.rules import (
    MomentumSGD,
    UpdateRule,
    decayed_gradients,
    recover_momentum,
    reverse_momentum_sgd,
)
from metateach.registry import HYPERGRADS
from metateach.teacher import TeachingContext
from metateach.types import Params, RNGState

__all__ = ["Reversible"]


class _Recorded(NamedTuple):
    """What it takes to recompute a step's gradient and undo it: the batch, the context, the
    random state, and the rate and momentum it took (a lesson's step settings applied)."""

    batch: Batch
    context: TeachingContext
    rng: RNGState
    base_lr: float  # the schedule's
    lr: float  # the step's: the schedule's times the lesson's scale
    momentum: float


class _Kept(NamedTuple):
    """The window's last step, taken with its graph: theta_{K-1} (leaves), its gradient with a
    second-order graph, and the lesson's step settings (with their graph to the teacher)."""

    theta: Params
    grads: Sequence[Tensor]
    settings: StepSettings | None


#: Why ``reversible`` refuses an optimizer (``optim.name``).
REFUSAL = (
    "teacher.hypergrad.method=reversible runs momentum SGD backwards: it needs optim.name=sgd "
    "with optim.momentum > 0 and optim.nesterov=false (got optim.name={name}); "
    "teacher.hypergrad.method=unrolled gives the same hypergradient for any optimizer, "
    "keeping the window's graphs"
)


@HYPERGRADS.register("reversible")
class Reversible(HypergradMethod):
    """Algorithm 1 of the deep-interaction paper: the same hypergradient as ``unrolled``, in O(1) graphs.

    All K steps are real steps. For the last B, the batch, the context, the
    learning rate and the random state are recorded. At the end of the window
    the adjoints run backwards from (theta_K, v_K): each step's parameters
    and momentum are recovered exactly as momentum SGD ran,

        theta_t = theta_{t+1} + lr_t v_{t+1},    v_t = (v_{t+1} - d_t) / mu,

    where d_t = grad L(theta_t) + lambda theta_t is recomputed on the same
    batch with the same augmentation and dropout draws, and the teacher's
    gradient accumulates through Hessian-vector products of d_t (one graph at
    a time). Two steps are not recomputed, as in ``unrolled``:

    - the window's last step keeps the graph of its real pass (theta_{K-1}
      and d_{K-1} need no recovering), held from that step to the window's end;
    - the window's first step needs only its teacher term, taken in forward
      mode (:func:`~metateach.engine.forward_mode.mixed_gradient`) at the
      theta_{K-B} it ran at, reusing that step's forward pass
      (:mod:`metateach.engine.tangent`: about one forward pass's activations,
      held to the window's end).

    Memory is flat in B: the last step's graph, held through the validation
    pass, then one replayed step's at a time, beside the first step's
    record. A lesson's step settings
    (:class:`~metateach.lesson.StepSettings`) make the
    rate lr_t, the decay lambda_t and the momentum mu_t of each step its own, as in
    Maclaurin et al.'s learned schedules: each step is undone with the values it
    took (recorded), and the settings' adjoints are
    -base_lr <d theta_{t+1}, v_{t+1}> for the rate's scale,
    <d v_{t+1}, theta_t> for the decay and <d v_{t+1}, v_t> for the momentum.
    ``teacher/reconstruction_error`` logs how far the recovered theta_{K-B}
    lies from the true one, relative to its norm. Needs mu > 0.

    Runs data-parallel: each process's d_t is its share (its part of the
    batch's gradient, the weight decay in rank 0's), and the adjoints of the
    parameters and the recovered momentum are summed over the processes at
    every step (:mod:`metateach.distributed`); the teacher's parts are summed
    when it steps.
    """

    data_parallel = True

    def __init__(self, problem: BilevelProblem, inner_steps: int, backprop_steps: int) -> None:
        super().__init__(problem, inner_steps, backprop_steps)
        self._recorded: list[_Recorded] = []
        self._start_params: Params | None = None  # theta_{K-B}, its forward pass recorded
        self._start_record: ForwardRecord | None = None
        self._start_momentum: list[Tensor | None] | None = None
        self._kept: _Kept | None = None
        self._meter = UpdateMeter(problem.student)  # from the window's first recorded step

    @classmethod
    def refuses_rule(cls, rule: UpdateRule) -> str | None:
        if isinstance(rule, MomentumSGD) and rule.invertible:
            return None
        return REFUSAL.format(name=rule.name)

    def can_checkpoint(self) -> bool:
        return not self._recorded  # recorded batches are not part of a checkpoint

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        # The last window is cut short, so that the final checkpoint holds the final state.
        self._forget_window()
        self.position = 0

    def _forget_window(self) -> None:
        if self._meter.running:
            self._meter.stop()
        self._recorded.clear()
        self._start_params = self._start_record = self._start_momentum = self._kept = None

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        window = self.position - (self.inner_steps - self.backprop_steps)
        if window < 0:
            stats = problem.real_step(batch, context)
        else:
            stats = self._recorded_step(
                batch, context, first=window == 0, last=window == self.backprop_steps - 1
            )
        self.position += 1
        if self.position == self.inner_steps:
            self._update_teacher()
            self.position = 0
        return stats

    @timed("window step")
    def _recorded_step(
        self, batch: Batch, context: TeachingContext, *, first: bool, last: bool
    ) -> Tensor:
        """A real step of the window, recorded to be undone; the first keeps its forward pass's
        record and the last (when it is not the first) its graph."""
        problem = self.problem
        keep = last and not first  # the first step needs no second-order graph
        if first:
            self._meter.start()
        rng = problem.rng_state()
        theta = {k: p.detach().clone().requires_grad_() for k, p in problem.params().items()}
        with second_order(keep):
            with recording(first) as record:  # the student's pass alone, not the teacher's
                states = problem.states(theta, batch.x, real=True)
            train = problem.taught(states, batch, context, teacher_grad=keep)
        grads = autograd.grad(train.loss, list(theta.values()), create_graph=keep)
        if first:
            # theta_{K-B}, the tensors the record holds, and v_{K-B} for a teacher of the
            # step: the first step's momentum setting's adjoint reads it.
            self._start_params = {k: p.detach() for k, p in theta.items()}
            self._start_record = record
            if problem.teacher is not None and problem.teacher.teaches_step:
                self._start_momentum = [
                    None if v is None else v.detach().clone() for v in problem.inner_state()
                ]
        problem.step_on([g.detach() for g in grads], train.loss, train.step_settings)
        if keep:
            self._kept = _Kept(theta, grads, train.step_settings)
        self._recorded.append(self._record(batch, context, rng, train.lesson))
        return problem.statistics(train.view, batch, train.lesson)

    def _record(
        self, batch: Batch, context: TeachingContext, rng: RNGState, lesson: Lesson | None
    ) -> _Recorded:
        """A step just taken, with the rate and momentum its lesson's step settings gave it."""
        problem = self.problem
        sgd = problem.rule
        assert isinstance(sgd, MomentumSGD)
        settings = None if lesson is None or lesson.step is None else lesson.step.detached()
        scale = 1.0 if settings is None or settings.lr_scale is None else float(settings.lr_scale)
        momentum = sgd.momentum
        if settings is not None and settings.momentum is not None:
            momentum = float(settings.momentum)
            if not momentum > 0:
                raise ValueError(
                    f"reversible undoes momentum SGD's steps by dividing by the momentum, and "
                    f"the lesson set it to {momentum}: it needs momentum > 0"
                )
        return _Recorded(batch, context, rng, problem.lr, problem.lr * scale, momentum)

    def _update_teacher(self) -> None:
        problem = self.problem
        sgd = problem.rule
        assert isinstance(sgd, MomentumSGD)
        teacher_params = problem.teacher_params()
        params = {k: p.detach().clone() for k, p in problem.params().items()}
        momentum = dict(zip(params, problem.inner_state(), strict=True))
        # The terms not of a batch (weight decay, the step settings' own) are rank 0's.
        constant = holds_constant_terms()

        theta = {k: p.requires_grad_() for k, p in params.items()}
        d_theta, val_loss = problem.val_gradient(theta)
        d_omega = [torch.zeros_like(p) for p in teacher_params]
        # The adjoint of v_{t+1} including theta_{t+1}'s dependence on it; v_K itself has none.
        d_v = {k: -self._recorded[-1].lr * g for k, g in d_theta.items()}
        params = {k: p.detach() for k, p in theta.items()}

        assert self._start_params is not None
        last = len(self._recorded) - 1
        for t in reversed(range(len(self._recorded))):
            record = self._recorded[t]
            # theta_{t+1} = theta_t - base_lr s_t v_{t+1}: the adjoint of the step's scale s_t.
            scale_adjoint = -record.base_lr * dot(d_theta, momentum)
            kept = self._kept if t == last else None
            if kept is None:
                params = reverse_momentum_sgd(params, momentum, record.lr)
            else:  # the last step's own theta_{K-1}: nothing to recover
                params = {k: p.detach() for k, p in kept.theta.items()}
            if t == 0:
                # The window's first step: only its teacher terms are left, <d_0, d_v>'s
                # derivative in omega, which forward mode gives without a second-order graph
                # (at the theta_{K-B} the step ran at, over its recorded forward pass),
                # and its step settings'.
                theta0 = self._start_params
                start = dict(zip(theta0, self._start_momentum or [None] * len(theta0), strict=True))
                adjoint = StepSettings(
                    scale_adjoint,
                    {k: (d_v[k] * theta0[k]).sum() for k in theta0},  # v_1 = ... + lambda theta_0
                    sum(
                        ((d_v[k] * v).sum() for k, v in start.items() if v is not None),
                        torch.zeros(()),
                    ),
                )
                mixed = mixed_gradient(
                    problem,
                    record.batch.x,
                    problem.taught_of(record.batch, record.context),
                    theta0,
                    d_v,
                    teacher_params,
                    record.rng,
                    self._start_record,
                    step_adjoint=adjoint if constant else None,
                )
                d_omega = [a if g is None else a + g for a, g in zip(d_omega, mixed, strict=True)]
                break
            if kept is None:
                theta = {k: p.detach().requires_grad_() for k, p in params.items()}
                with phase("replay"):
                    with problem.own_rng(record.rng), second_order():
                        replay = problem.train_loss(theta, record.batch, record.context, real=False)
                    grads = autograd.grad(replay.loss, list(theta.values()), create_graph=True)
                settings = replay.step_settings
            else:
                theta, grads, settings = kept
            _, decay, _ = problem.step_settings(theta, settings)
            per = [sgd.weight_decay if d is None else d for d in decay or [None] * len(theta)]
            decayed = decayed_gradients(
                dict(zip(theta, grads, strict=True)),
                theta,
                {k: d if constant else 0.0 for k, d in zip(theta, per, strict=True)},
            )
            direction = sum_gradients([v.detach() for v in decayed.values()])
            previous = recover_momentum(
                momentum, dict(zip(decayed, direction, strict=True)), record.momentum
            )
            # One backward through the gradient graph: (d/d omega, d/d theta) of <d_t, d_v>,
            # and the step settings' share: the scale's, and the momentum's (v_{t+1} = mu v_t + d_t).
            objective = dot(decayed, d_v)
            if settings is not None and constant:
                momentum_adjoint = dot(previous, d_v)
                objective = objective + settings.dot(
                    StepSettings(scale_adjoint, None, momentum_adjoint)
                )
            with phase("window backward"):
                vjp = autograd.grad(
                    objective, [*teacher_params, *theta.values()], allow_unused=True
                )
            for i, g in enumerate(vjp[: len(teacher_params)]):
                if g is not None:
                    d_omega[i] += g
            for k, g in zip(theta, sum_gradients(vjp[len(teacher_params) :]), strict=True):
                if g is not None:
                    d_theta[k] = d_theta[k] + g
            momentum = previous
            previous_lr = self._recorded[t - 1].lr
            d_v = {k: record.momentum * d_v[k] - previous_lr * d_theta[k] for k in d_v}

        error = torch.sqrt(
            sum(
                ((params[k] - self._start_params[k]).double().square().sum() for k in params),
                torch.zeros(()),
            )
        )
        scale = torch.sqrt(
            sum((p.double().square().sum() for p in self._start_params.values()), torch.zeros(()))
        )
        self.record(
            **self._meter.stop(),
            **{
                "teacher/val_loss": float(val_loss.detach()),
                "teacher/reconstruction_error": float(error / scale.clamp(min=1e-30)),
            },
        )
        self._forget_window()
        self.update_teacher(d_omega)
