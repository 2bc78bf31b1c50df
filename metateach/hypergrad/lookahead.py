"""One virtual step of the student, differentiated exactly, with first derivatives and one JVP.

With theta' = theta - U(g, s) the student optimizer's step, g = grad_theta
L(theta, omega) the lesson's gradient, s the optimizer's state (momentum,
Adam's moments, ...) and u = grad L_val(theta'), the chain rule gives

    d L_val(theta') / d omega = d/d omega <g(theta, omega), w>,  w = (d theta' / d g)^T u.

w is one vector-Jacobian product of the update rule, element-wise
(:meth:`~metateach.engine.problem.BilevelProblem.virtual_step`): -lr u
for momentum SGD, -lr (1 + mu) u with Nesterov's, the derivative of Adam's
step for Adam. A lesson's step settings s (a learning-rate scale, weight decay, momentum)
add d/d omega <s(omega), c>, c = (d theta' / d s)^T u, one more element-wise
vector-Jacobian product of the update. The right-hand side is
:func:`~metateach.engine.forward_mode.mixed_gradient`: one
forward-mode pass of the student with theta carrying the tangent w, then
reverse mode twice through the lesson alone. No second-order backward
through the student is taken. The result is the number the differentiated virtual step
gives (``tests/test_hypergrad.py`` checks it against finite differences
and against the graph through the virtual step, with BatchNorm and Nesterov;
``tests/test_check.py`` for every optimizer).

References:
    Ren, Zeng, Yang and Urtasun, "Learning to reweight examples for robust
    deep learning", ICML 2018.
    Shu et al., "Meta-Weight-Net: learning an explicit mapping for sample
    weighting", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, autograd

from metateach.data import Batch
from metateach.distributed import holds_constant_terms, sum_gradients
from metateach.engine.forward_mode import mixed_gradient
from metateach.engine.phases import phase
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.strategy import PerStepMethod
from metateach.engine.tangent import ForwardRecord
from metateach.lesson import StepSettings
from metateach.registry import HYPERGRADS
from metateach.student import StudentStates
from metateach.types import Params, RNGState

__all__ = ["Lookahead", "lookahead_gradient", "virtual_direction"]


def virtual_direction(
    problem: BilevelProblem,
    params: Params,
    grads: Sequence[Tensor],
    val_batch: Batch | None = None,
    settings: StepSettings | None = None,
) -> tuple[Params, StepSettings | None, Tensor]:
    """w = (d theta' / d g)^T grad L_val(theta'), the step settings' adjoint
    (d theta' / d s)^T grad L_val(theta') and L_val(theta'), theta' the student
    optimizer's step on ``grads`` = g under the lesson's step ``settings`` s.

    ``grads`` follow the order of ``params``; nothing here keeps a graph to
    them. ``val_batch`` defaults to the validation stream's next draw. With the
    batches sharded over processes, ``grads`` and the validation gradient
    are summed over them (:mod:`metateach.distributed`), and the settings'
    adjoint is rank 0's alone (the settings are the same on every process).
    """
    grads = sum_gradients(grads)
    virtual, pullback = problem.virtual_step(params, grads, settings)
    virtual = {k: p.requires_grad_() for k, p in virtual.items()}
    u, val_loss = problem.val_gradient(virtual, val_batch)
    adjoint = None
    if settings is not None and holds_constant_terms():
        adjoint = problem.step_adjoint(params, grads, settings, u)
    return pullback(u), adjoint, val_loss


def lookahead_gradient(
    problem: BilevelProblem,
    x: Tensor,
    taught_of: Callable[[StudentStates], TrainPass | Tensor],
    params: Params,
    grads: Sequence[Tensor],
    targets: Sequence[Tensor],
    rng: RNGState | None,
    val_batch: Batch | None = None,
    record: ForwardRecord | None = None,
    settings: StepSettings | None = None,
) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """d L_val(theta') / d ``targets`` and L_val(theta'), theta' one optimizer step on the training loss.

    The training loss is ``taught_of`` the student's states on the inputs
    ``x``, with its graph to ``targets``; ``grads`` its gradient in
    ``params`` (the caller has it from its own pass, taken from the random
    state ``rng``, recorded in ``record`` if given), ``settings`` its lesson's
    step settings. ``val_batch`` as in :func:`virtual_direction`.
    """
    direction, adjoint, val_loss = virtual_direction(problem, params, grads, val_batch, settings)
    found = mixed_gradient(
        problem, x, taught_of, params, direction, targets, rng, record, step_adjoint=adjoint
    )
    return found, val_loss


@HYPERGRADS.register("lookahead")
class Lookahead(PerStepMethod):
    """theta' = one step of the student's optimizer on the lesson's loss; the teacher follows
    d L_val(theta') / d omega.

    The virtual step is the student's own optimizer step (its state, momentum or
    moments, and weight decay included); K = B = 1 in the engine's terms (``inner_steps`` > 1
    updates the teacher every K-th step). Computed as the module docstring
    says: the training gradient, a validation gradient, one forward-mode pass (a
    tangent pass over the training forward's records, :mod:`metateach.engine.tangent`).
    """

    data_parallel = True
    records_forward = True

    def teacher_gradient(
        self, params: Params, batch: Batch, train: TrainPass
    ) -> Sequence[Tensor | None]:
        problem = self.problem
        with phase("training backward"):
            grads = autograd.grad(train.loss, list(params.values()), retain_graph=True)
        found, val_loss = lookahead_gradient(
            problem,
            batch.x,
            problem.taught_of(batch, train.view.context),
            params,
            grads,
            problem.teacher_params(),
            self.forward_rng,
            record=self.forward_record,
            settings=train.step_settings,
        )
        self.record(**{"teacher/val_loss": float(val_loss)})
        return found
