"""One virtual step of the student, differentiated exactly, with first derivatives and one JVP.

With theta' = theta - c (mu v + lambda theta + grad_theta L(theta, omega)) the
student optimizer's step (c its :attr:`~metateach.hypergrad.problem.SGDSettings.gradient_scale`)
and u = grad L_val(theta'), the chain rule gives

    d L_val(theta') / d omega = -c d/d omega <grad_theta L(theta, omega), u>.

The right-hand side is
:meth:`~metateach.hypergrad.problem.BilevelProblem.mixed_gradient`: one
forward-mode pass of the student with theta carrying the tangent u, then
reverse mode twice through the lesson alone. No second-order backward
through the student is taken. The result is the number the differentiated virtual step
gives (``tests/test_hypergrad.py`` checks it against finite differences
and against the graph through the virtual step, with BatchNorm and Nesterov).

References:
    Ren, Zeng, Yang and Urtasun, "Learning to reweight examples for robust
    deep learning", ICML 2018.
    Shu et al., "Meta-Weight-Net: learning an explicit mapping for sample
    weighting", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.distributed import sum_gradients
from metateach.hypergrad.base import PerStepMethod
from metateach.hypergrad.functional import Params
from metateach.hypergrad.problem import BilevelProblem, RNGState, TrainPass
from metateach.registry import HYPERGRADS
from metateach.student import StudentStates

__all__ = ["Lookahead", "lookahead_gradient", "virtual_direction"]


def virtual_direction(
    problem: BilevelProblem, params: Params, grads: Sequence[Tensor], val_batch: Batch | None = None
) -> tuple[Params, Tensor]:
    """u = grad L_val(theta') and L_val(theta'), theta' the student optimizer's step on ``grads``.

    ``grads`` follow the order of ``params``; nothing here keeps a graph to
    them. ``val_batch`` defaults to the validation stream's next draw. With the
    batches sharded over processes, ``grads`` and the validation gradient
    are summed over them (:mod:`metateach.distributed`).
    """
    with torch.no_grad():
        virtual, _ = problem.sgd_step(params, problem.momentum(), sum_gradients(grads))
    virtual = {k: p.detach().requires_grad_() for k, p in virtual.items()}
    return problem.val_gradient(virtual, val_batch)


def lookahead_gradient(
    problem: BilevelProblem,
    x: Tensor,
    loss_of: Callable[[StudentStates], Tensor],
    params: Params,
    grads: Sequence[Tensor],
    targets: Sequence[Tensor],
    rng: RNGState | None,
    val_batch: Batch | None = None,
) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """d L_val(theta') / d ``targets`` and L_val(theta'), theta' one optimizer step on the training loss.

    The training loss is ``loss_of`` the student's states on the inputs
    ``x``, with its graph to ``targets``; ``grads`` its gradient in
    ``params`` (the caller has it from its own pass, taken from the random
    state ``rng``). ``val_batch`` as in :func:`virtual_direction`.
    """
    direction, val_loss = virtual_direction(problem, params, grads, val_batch)
    mixed = problem.mixed_gradient(x, loss_of, params, direction, targets, rng)
    scale = -problem.sgd().gradient_scale
    return tuple(None if g is None else scale * g for g in mixed), val_loss


@HYPERGRADS.register("lookahead")
class Lookahead(PerStepMethod):
    """theta' = one momentum-SGD step of the lesson's loss; the teacher follows d L_val(theta') / d omega.

    The virtual step is the student's own optimizer step (momentum and weight
    decay included); K = B = 1 in the engine's terms (``inner_steps`` > 1
    updates the teacher every K-th step). Computed as the module docstring
    says: the training gradient, a validation gradient, one forward-mode pass.
    """

    data_parallel = True

    def teacher_gradient(
        self, params: Params, batch: Batch, train: TrainPass
    ) -> Sequence[Tensor | None]:
        problem = self.problem
        grads = autograd.grad(train.loss, list(params.values()), retain_graph=True)
        loss_of = problem.lesson_loss_of(batch, train.view.context)
        found, val_loss = lookahead_gradient(
            problem, batch.x, loss_of, params, grads, problem.teacher_params(), self.forward_rng
        )
        self.record(**{"teacher/val_loss": float(val_loss)})
        return found
