"""One virtual step of the student, differentiated exactly.

References:
    Ren, Zeng, Yang and Urtasun, "Learning to reweight examples for robust
    deep learning", ICML 2018.
    Shu et al., "Meta-Weight-Net: learning an explicit mapping for sample
    weighting", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, autograd

from metateach.data import Batch
from metateach.hypergrad.base import PerStepMethod
from metateach.hypergrad.functional import Params
from metateach.hypergrad.problem import TrainPass
from metateach.registry import HYPERGRADS

__all__ = ["Lookahead"]


@HYPERGRADS.register("lookahead")
class Lookahead(PerStepMethod):
    """theta' = one momentum-SGD step of the lesson's loss; the teacher follows d L_val(theta') / d omega.

    The virtual step is the student's own optimizer step (momentum and weight
    decay included), taken functionally with its graph; K = B = 1 in the
    engine's terms (``inner_steps`` > 1 updates the teacher every K-th step).
    """

    def teacher_gradient(
        self, params: Params, batch: Batch, train: TrainPass
    ) -> Sequence[Tensor | None]:
        problem = self.problem
        grads = autograd.grad(
            train.loss, list(params.values()), create_graph=True, retain_graph=True
        )
        virtual, _ = problem.sgd_step(params, problem.momentum(), grads)
        val_loss = problem.val_loss(virtual, problem.next_val_batch())
        self.record(**{"teacher/val_loss": float(val_loss.detach())})
        return autograd.grad(
            val_loss, problem.teacher_params(), retain_graph=True, allow_unused=True
        )
