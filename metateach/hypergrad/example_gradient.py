"""The validation loss's gradient with respect to each training sample's weight.

References:
    Ren, Zeng, Yang and Urtasun, "Learning to reweight examples for robust
    deep learning", ICML 2018, Eq. 4-7.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metateach.data import Batch
from metateach.engine.problem import BilevelProblem
from metateach.engine.strategy import Differentiates, HypergradMethod
from metateach.engine.tangent import ForwardRecord, recording
from metateach.hypergrad.lookahead import lookahead_gradient
from metateach.lesson import Lesson, lesson_loss
from metateach.registry import STRATEGIES
from metateach.student import StudentStates
from metateach.teacher import StudentView, TeachingContext
from metateach.types import RNGState

__all__ = ["ExampleGradients", "example_gradient"]


def example_gradient(
    problem: BilevelProblem,
    batch: Batch,
    rng: RNGState | None,
    val_batch: Batch | None = None,
    record: ForwardRecord | None = None,
) -> Tensor:
    """d L_val(theta'(eps)) / d eps at eps = 0, one value per sample of ``batch``.

    theta'(eps) is one step of the student's optimizer on sum_k eps_k l_k / n
    from the current parameters; at eps = 0 the loss's gradient is zero, so
    theta' is where momentum and weight decay alone take the student. ``rng``
    is the random state of the batch's forward pass (``record`` its record,
    when it was taken at the current parameters), ``val_batch`` the
    validation batch (the stream's next by default). Negative entries mark
    samples whose up-weighting would lower the validation loss. Computed by
    :func:`~metateach.hypergrad.lookahead.lookahead_gradient`: a validation
    gradient and one forward-mode pass of the batch.
    """
    params = problem.params()
    eps = torch.zeros(len(batch.y), dtype=batch.x.dtype, device=batch.x.device, requires_grad=True)

    def weighted_loss(states: StudentStates) -> Tensor:
        return lesson_loss(Lesson(weights=eps), states.logits, batch.y)

    zero = [torch.zeros_like(p) for p in params.values()]
    (grad,), _ = lookahead_gradient(
        problem, batch.x, weighted_loss, params, zero, [eps], rng, val_batch, record
    )
    assert grad is not None
    return grad


@STRATEGIES.register("example_gradient")
class ExampleGradients(HypergradMethod):
    """The strategy of :class:`~metateach.teacher.ExampleGradient` teachers: every step,
    compute the samples' hypergradients, hand them to the teacher, step the student.

    The real forward pass serves the teacher's view and the student's step,
    and BatchNorm's running statistics are updated once. Costs a validation
    gradient and a forward-mode pass beyond a plain step.
    """

    data_parallel = True
    differentiates = Differentiates.SAMPLE_WEIGHTS

    def __init__(self, problem: BilevelProblem) -> None:
        super().__init__(problem, inner_steps=1, backprop_steps=1)

    def _span_hypergradient(
        self, batches: list[Batch], contexts: list[TeachingContext], rates: list[float] | None
    ) -> dict[str, Tensor]:
        """``{"sample_weights": d L_val / d eps}`` for the one batch of the span: the teacher has
        no parameters, and reads its lesson off this (see :meth:`HypergradMethod.hypergradient`)."""
        if len(batches) != 1:
            raise ValueError(f"example gradients are taken on one batch, got {len(batches)}")
        self.set_rate(rates, 0)
        _, grad = self._examined(batches[0])
        return {"sample_weights": grad}

    def _examined(self, batch: Batch) -> tuple[StudentStates, Tensor]:
        """The real forward pass on ``batch`` and the samples' hypergradients."""
        problem = self.problem
        rng = problem.rng_state()
        with recording() as record:
            states = problem.states(problem.params(), batch.x, real=True)
        return states, example_gradient(problem, batch, rng, record=record)

    def previewed(self, view: StudentView, batch: Batch, rng: RNGState) -> StudentView:
        """The view with the samples' hypergradients, on the first validation batch (the
        stream's position stays where the run left it)."""
        stream = self.problem.val_stream
        if stream is None:
            return view
        grad = example_gradient(self.problem, batch, rng, stream.loader.batch_at(0, 0))
        return view._replace(example_grad=grad.detach())

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        with self.measured():
            states, grad = self._examined(batch)
        view = problem.view(states, batch, context)._replace(example_grad=grad.detach())
        lesson = problem.lesson(batch, view, teacher_grad=False)
        problem.apply_gradients(lesson_loss(lesson, states, batch.y))
        self.record(**{"teacher/negative_share": float((grad < 0).double().mean())})
        return problem.statistics(view, batch, lesson)
