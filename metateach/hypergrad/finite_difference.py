"""The one-step hypergradient with a finite difference in place of second derivatives.

References:
    Liu, Simonyan and Yang, "DARTS: differentiable architecture search",
    ICLR 2019, Eq. 7-8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.strategy import PerStepMethod
from metateach.functional import (
    Params,
    dot,
    scratch_buffers,
    student_forward,
)
from metateach.hypergrad.lookahead import virtual_direction
from metateach.lesson import lesson_loss
from metateach.registry import HYPERGRADS

__all__ = ["FiniteDifference"]


@HYPERGRADS.register("finite_difference")
class FiniteDifference(PerStepMethod):
    """DARTS's approximation of ``lookahead``: first derivatives only.

    With theta' the virtual step and w = (d theta' / d g)^T grad L_val(theta')
    (-lr grad L_val(theta') for SGD, as in DARTS; see :mod:`~metateach.hypergrad.lookahead`),
    the exact hypergradient is d/d omega <grad_theta L_train(theta, omega), w>.
    The mixed second derivative is replaced by a central difference,

        (grad_omega L_train(theta + eps w) - grad_omega L_train(theta - eps w)) / (2 eps),

    with eps = ``epsilon`` / ||w||. Error O(eps^2); no Hessian-vector products. A
    lesson's step settings s add d/d omega <s, c> exactly (first derivatives only:
    c = (d theta' / d s)^T grad L_val(theta'), see :mod:`~metateach.hypergrad.lookahead`).

    Args:
        epsilon: the step along w, relative to ||w|| (DARTS uses 0.01).
    """

    data_parallel = True

    def __init__(
        self,
        problem: BilevelProblem,
        inner_steps: int = 1,
        backprop_steps: int = 1,
        epsilon: float = 0.01,
    ) -> None:
        super().__init__(problem, inner_steps, backprop_steps)
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.epsilon = epsilon

    def teacher_gradient(
        self, params: Params, batch: Batch, train: TrainPass
    ) -> Sequence[Tensor | None]:
        problem = self.problem
        grads = autograd.grad(train.loss, list(params.values()), retain_graph=True)
        settings = train.step_settings
        direction, adjoint, val_loss = virtual_direction(problem, params, grads, settings=settings)
        eps = self.epsilon / float(torch.sqrt(dot(direction, direction)).clamp(min=1e-12))

        difference = 0.0
        for sign in (1.0, -1.0):
            shifted = {k: params[k].detach() + sign * eps * direction[k] for k in params}
            with torch.no_grad(), problem.own_rng(self.forward_rng):
                states = student_forward(
                    problem.student, shifted, batch.x, scratch_buffers(problem.student)
                )
            # The teacher keeps seeing the student at theta unless its weights may depend on theta.
            view = (
                problem.view(states, batch, train.view.context)
                if problem.keep_weight_grad
                else train.view
            )
            lesson = problem.lesson(batch, view, teacher_grad=True)
            difference = difference + sign * lesson_loss(lesson, states, batch.y)
        self.record(**{"teacher/val_loss": float(val_loss)})
        # The step settings' share is first-order: exact, no difference needed.
        total = difference / (2 * eps)
        if settings is not None and adjoint is not None:
            total = total + settings.dot(adjoint)
        if not total.requires_grad:  # nothing of the teacher's acts in this batch
            return [None] * len(problem.teacher_params())
        return list(
            autograd.grad(total, problem.teacher_params(), allow_unused=True, retain_graph=True)
        )
