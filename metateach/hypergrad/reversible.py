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
from metateach.engine.problem import BilevelProblem
from metateach.engine.second_order import second_order
from metateach.engine.strategy import HypergradMethod
from metateach.functional import dot
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
    """What it takes to recompute a step's gradient: the batch, the context, the rate, the random state."""

    batch: Batch
    context: TeachingContext
    lr: float
    rng: RNGState


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

    All K steps are plain steps. For the last B, the batch, the context, the
    learning rate and the random state are recorded. At the end of the window
    the adjoints run backwards from (theta_K, v_K): each step's parameters
    and momentum are recovered exactly as momentum SGD ran,

        theta_t = theta_{t+1} + lr_t v_{t+1},    v_t = (v_{t+1} - d_t) / mu,

    where d_t = grad L(theta_t) + lambda theta_t is recomputed on the same
    batch with the same augmentation and dropout draws, and the teacher's
    gradient accumulates through Hessian-vector products of d_t (one graph at
    a time). The window's first step needs only its teacher term, taken in
    forward mode (:func:`~metateach.engine.forward_mode.mixed_gradient`).
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
        self._start_params: Params | None = None

    @classmethod
    def refuses_rule(cls, rule: UpdateRule) -> str | None:
        if isinstance(rule, MomentumSGD) and rule.invertible:
            return None
        return REFUSAL.format(name=rule.name)

    def can_checkpoint(self) -> bool:
        return not self._recorded  # recorded batches are not part of a checkpoint

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        # The last window is cut short, so that the final checkpoint holds the final state.
        self._recorded.clear()
        self._start_params = None
        self.position = 0

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        if self.position >= self.inner_steps - self.backprop_steps:
            if not self._recorded:
                # theta_{K-B}, kept only to report the reconstruction error.
                self._start_params = {k: p.detach().clone() for k, p in problem.params().items()}
            self._recorded.append(_Recorded(batch, context, problem.lr, problem.rng_state()))
        stats = problem.real_step(batch, context)
        self.position += 1
        if self.position == self.inner_steps:
            with self.measured():
                self._update_teacher()
            self.position = 0
        return stats

    def _update_teacher(self) -> None:
        problem = self.problem
        sgd = problem.rule
        assert isinstance(sgd, MomentumSGD)
        teacher_params = problem.teacher_params()
        params = {k: p.detach().clone() for k, p in problem.params().items()}
        momentum = dict(zip(params, problem.inner_state(), strict=True))

        theta = {k: p.requires_grad_() for k, p in params.items()}
        d_theta, val_loss = problem.val_gradient(theta)
        d_omega = [torch.zeros_like(p) for p in teacher_params]
        # The adjoint of v_{t+1} including theta_{t+1}'s dependence on it; v_K itself has none.
        d_v = {k: -self._recorded[-1].lr * g for k, g in d_theta.items()}
        params = {k: p.detach() for k, p in theta.items()}

        for t in reversed(range(len(self._recorded))):
            record = self._recorded[t]
            params = reverse_momentum_sgd(params, momentum, record.lr)
            if t == 0:
                # The window's first step: only its teacher term is left, <d_0, d_v>'s
                # derivative in omega, which forward mode gives without a second-order graph.
                loss_of = problem.lesson_loss_of(record.batch, record.context)
                mixed = mixed_gradient(
                    problem, record.batch.x, loss_of, params, d_v, teacher_params, record.rng
                )
                d_omega = [a if g is None else a + g for a, g in zip(d_omega, mixed, strict=True)]
                break
            theta = {k: p.detach().requires_grad_() for k, p in params.items()}
            with problem.own_rng(record.rng), second_order():
                replay = problem.train_loss(theta, record.batch, record.context, real=False)
            grads = autograd.grad(replay.loss, list(theta.values()), create_graph=True)
            decay = sgd.weight_decay if holds_constant_terms() else 0.0
            decayed = decayed_gradients(dict(zip(theta, grads, strict=True)), theta, decay)
            # One backward through the gradient graph: (d/d omega, d/d theta) of <d_t, d_v>.
            vjp = autograd.grad(
                dot(decayed, d_v), [*teacher_params, *theta.values()], allow_unused=True
            )
            for i, g in enumerate(vjp[: len(teacher_params)]):
                if g is not None:
                    d_omega[i] += g
            for k, g in zip(theta, sum_gradients(vjp[len(teacher_params) :]), strict=True):
                d_theta[k] = d_theta[k] + g
            direction = sum_gradients([v.detach() for v in decayed.values()])
            momentum = recover_momentum(
                momentum, dict(zip(decayed, direction, strict=True)), sgd.momentum
            )
            previous_lr = self._recorded[t - 1].lr
            d_v = {k: sgd.momentum * d_v[k] - previous_lr * d_theta[k] for k in d_v}

        assert self._start_params is not None
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
            **{
                "teacher/val_loss": float(val_loss.detach()),
                "teacher/reconstruction_error": float(error / scale.clamp(min=1e-30)),
            }
        )
        self._recorded.clear()
        self._start_params = None
        self.update_teacher(d_omega)
