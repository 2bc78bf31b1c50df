"""Truncated reverse-mode differentiation through the student's steps.

References:
    Fan et al., "Learning to Teach with Deep Interactions", 2020, Sec. 3.2
    (K = 20 student steps per teacher step, B = 2 of them differentiated).
    Shaban et al., "Truncated back-propagation for bilevel optimization",
    AISTATS 2019.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, autograd

from metateach.data import Batch
from metateach.hypergrad.base import HypergradMethod, UpdateMeter
from metateach.hypergrad.functional import Params
from metateach.hypergrad.problem import BilevelProblem
from metateach.registry import HYPERGRADS
from metateach.teacher import TeachingContext

__all__ = ["Unrolled"]


@HYPERGRADS.register("unrolled")
class Unrolled(HypergradMethod):
    """K real student steps per teacher step; the last B keep their graph.

    The first K - B steps of a window are plain steps. The last B are taken
    functionally, keeping the graph from the teacher's parameters through
    each lesson and each momentum-SGD update to theta_K; the teacher then
    steps on the gradient of the validation loss at theta_K. Memory grows
    with B (one graph per step); see ``reversible`` for the constant-memory
    equivalent.
    """

    def __init__(self, problem: BilevelProblem, inner_steps: int, backprop_steps: int) -> None:
        super().__init__(problem, inner_steps, backprop_steps)
        self._params: Params | None = None
        self._momentum: Params | None = None
        self._meter = UpdateMeter(problem.student)

    def can_checkpoint(self) -> bool:
        return self._params is None  # a graph in the making cannot be saved

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        # The last window is cut short: its steps stand, its teacher step is dropped,
        # and the final checkpoint holds the final state.
        if self._params is not None:
            self._meter.stop()
        self._params = self._momentum = None
        self.position = 0

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        if self.position < self.inner_steps - self.backprop_steps:
            stats = problem.real_step(batch, context)
        else:
            if self._params is None:  # theta_{K-B}: where the differentiated steps start
                self._meter.start()
                self._params = {
                    k: p.detach().clone().requires_grad_() for k, p in problem.params().items()
                }
                self._momentum = {
                    k: None if v is None else v.detach() for k, v in problem.momentum().items()
                }
            train = problem.train_loss(self._params, batch, context, real=True)
            grads = autograd.grad(train.loss, list(self._params.values()), create_graph=True)
            self._params, self._momentum = problem.sgd_step(self._params, self._momentum, grads)
            problem.write_back(self._params, self._momentum)
            stats = problem.statistics(train.view, batch, train.lesson)
        self.position += 1
        if self.position == self.inner_steps:
            self._update_teacher()
            self.position = 0
        return stats

    def _update_teacher(self) -> None:
        self.update_teacher(self.close_window(self.problem.teacher_params()))

    def close_window(self, targets: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        """d(validation loss at theta_K)/d ``targets``; frees the window's graph."""
        assert self._params is not None
        val_loss = self.problem.val_loss(self._params, self.problem.next_val_batch())
        grads = autograd.grad(val_loss, list(targets), allow_unused=True)
        self.record(**self._meter.stop(), **{"teacher/val_loss": float(val_loss.detach())})
        self._params = self._momentum = None
        return grads
