"""The validation loss's gradient with respect to each training sample's weight.

References:
    Ren, Zeng, Yang and Urtasun, "Learning to reweight examples for robust
    deep learning", ICML 2018, Eq. 4-7.
"""

from __future__ import annotations

import torch
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.hypergrad.base import HypergradMethod
from metateach.hypergrad.functional import student_forward
from metateach.hypergrad.problem import BilevelProblem
from metateach.lesson import Lesson, lesson_loss
from metateach.teacher import TeachingContext

__all__ = ["ExampleGradients", "example_gradient"]


def example_gradient(
    problem: BilevelProblem, logits: Tensor, batch: Batch, val_batch: Batch | None = None
) -> Tensor:
    """d L_val(theta'(eps)) / d eps at eps = 0, one value per sample of ``batch``.

    theta'(eps) is one step of the student's optimizer on sum_k eps_k l_k / n
    from the current parameters, ``logits`` the current forward pass (with
    its graph), ``val_batch`` the validation batch (the stream's next by
    default). Negative entries mark samples whose up-weighting would lower
    the validation loss.
    """
    params = problem.params()
    eps = torch.zeros(len(batch.y), dtype=logits.dtype, device=logits.device, requires_grad=True)
    loss = lesson_loss(Lesson(weights=eps), logits, batch.y)
    grads = autograd.grad(loss, list(params.values()), create_graph=True, retain_graph=True)
    virtual, _ = problem.sgd_step(params, problem.momentum(), grads)
    val_loss = problem.val_loss(
        virtual, val_batch if val_batch is not None else problem.next_val_batch()
    )
    (grad,) = autograd.grad(val_loss, eps, retain_graph=True)
    return grad


class ExampleGradients(HypergradMethod):
    """The strategy of :class:`~metateach.teacher.ExampleGradient` teachers: every step,
    compute the samples' hypergradients, hand them to the teacher, step the student.

    One forward pass serves the virtual step and the real one, and BatchNorm's
    running statistics are updated once. Costs about what ``lookahead`` does.
    """

    def __init__(self, problem: BilevelProblem) -> None:
        super().__init__(problem, inner_steps=1, backprop_steps=1)

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        with self.measured():
            states = student_forward(problem.student, problem.params(), batch.x)
            grad = example_gradient(problem, states.logits, batch)
        view = problem.view(states, batch, context)._replace(example_grad=grad.detach())
        lesson = problem.lesson(batch, view, teacher_grad=False)
        problem.apply_gradients(lesson_loss(lesson, states.logits, batch.y))
        self.record(**{"teacher/negative_share": float((grad < 0).double().mean())})
        return problem.statistics(view, batch, lesson)
