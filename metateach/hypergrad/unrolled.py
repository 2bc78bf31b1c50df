"""Truncated reverse-mode differentiation through the student's steps.

References:
    Fan et al., "Learning to Teach with Deep Interactions", 2020, Sec. 3.2
    (K = 20 student steps per teacher step, B = 2 of them differentiated).
    Shaban et al., "Truncated back-propagation for bilevel optimization",
    AISTATS 2019.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.distributed import sum_gradients
from metateach.engine.forward_mode import mixed_gradient
from metateach.engine.meter import UpdateMeter
from metateach.engine.phases import phase, timed
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.second_order import second_order
from metateach.engine.strategy import HypergradMethod
from metateach.engine.tangent import ForwardRecord, recording
from metateach.optim.rules import State
from metateach.registry import HYPERGRADS
from metateach.teacher import TeachingContext
from metateach.types import Params, RNGState

__all__ = ["Unrolled"]


class _FirstStep(NamedTuple):
    """The window's first differentiated step, whose teacher term is taken in forward mode."""

    params: Params  # theta_{K-B}
    batch: Batch
    context: TeachingContext
    rng: RNGState  # before its forward pass
    gradient: Params  # its gradient, as leaves of the window's graph
    record: ForwardRecord | None  # its forward pass, for the tangent pass


@HYPERGRADS.register("unrolled")
class Unrolled(HypergradMethod):
    """K real student steps per teacher step; the last B keep their graph.

    Runs data-parallel: each differentiated step's gradient is summed over
    the processes inside the graph (:func:`~metateach.distributed.sum_gradients`).

    The first K - B steps of a window are plain steps. The last B are taken
    functionally, keeping the graph from the teacher's parameters through
    each lesson and each update of the student's optimizer to theta_K; the teacher then
    steps on the gradient of the validation loss at theta_K. Memory grows
    with B (one graph per step); see ``reversible`` for the constant-memory
    equivalent.

    The first of the B steps needs no second-order graph: nothing before it
    is differentiated, so only its gradient's dependence on the teacher
    matters. Its gradient g enters the graph as a leaf; at the window's end
    the validation loss's gradient a with respect to that leaf gives the
    step's teacher term d/d omega <g(theta_{K-B}, omega), a> by one
    forward-mode pass (:func:`~metateach.engine.forward_mode.mixed_gradient`),
    which reuses that step's forward pass (:mod:`metateach.engine.tangent`: the
    window holds its records, about one forward pass's activations, until its end).
    With B = 1 no step keeps a second-order graph.

    A lesson's step settings (:class:`~metateach.lesson.StepSettings`) enter each
    differentiated step's update with their graph, the first step's too: the
    window's backward reaches the teacher through them as through the gradients.
    """

    data_parallel = True

    def __init__(self, problem: BilevelProblem, inner_steps: int, backprop_steps: int) -> None:
        super().__init__(problem, inner_steps, backprop_steps)
        self._params: Params | None = None
        self._state: State = None
        self._first: _FirstStep | None = None
        self._meter = UpdateMeter(problem.student)

    def can_checkpoint(self) -> bool:
        return self._params is None  # a graph in the making cannot be saved

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        # The last window is cut short: its steps stand, its teacher step is dropped,
        # and the final checkpoint holds the final state.
        if self._meter.running:
            self._meter.stop()
        self._params = self._state = self._first = None
        self.position = 0

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        if self.position < self.inner_steps - self.backprop_steps:
            stats = problem.real_step(batch, context)
        else:
            stats = self._window_step(batch, context)
        self.position += 1
        if self.position == self.inner_steps:
            self._update_teacher()
            self.position = 0
        return stats

    @timed("window step")
    def _window_step(self, batch: Batch, context: TeachingContext) -> Tensor:
        """One of the window's B steps, taken functionally with its graph."""
        problem = self.problem
        if self._params is None:
            self._meter.start()
            train = self._first_step(batch, context)
        else:
            with second_order():
                train = problem.train_loss(self._params, batch, context, real=True)
            grads = autograd.grad(train.loss, list(self._params.values()), create_graph=True)
            grads = sum_gradients(grads, differentiable=True)
            self._params, self._state = problem.inner_step(
                self._params, self._state, grads, train.step_settings
            )
        problem.write_back(self._params, self._state)
        return problem.statistics(train.view, batch, train.lesson)

    def _first_step(self, batch: Batch, context: TeachingContext) -> TrainPass:
        """theta_{K-B} -> theta_{K-B+1}, with a graph from the step's gradient (a leaf) onwards."""
        problem = self.problem
        start = {k: p.detach().clone().requires_grad_() for k, p in problem.params().items()}
        rng = problem.rng_state()
        with recording() as record:
            states = problem.states(start, batch.x, real=True)
        train = problem.taught(states, batch, context)
        # A lesson's step settings may share the teacher's graph with its loss: kept for the window.
        keep = train.step_settings is not None
        found = sum_gradients(autograd.grad(train.loss, list(start.values()), retain_graph=keep))
        gradient = dict(zip(start, found, strict=True))
        for g in gradient.values():
            g.requires_grad_()
        start = {k: p.detach() for k, p in start.items()}
        self._first = _FirstStep(start, batch, context, rng, gradient, record)
        self._params, self._state = problem.inner_step(
            start, problem.inner_state(), list(gradient.values()), train.step_settings
        )
        return train

    def _update_teacher(self) -> None:
        self.update_teacher(self.close_window(self.problem.teacher_params()))

    def close_window(self, targets: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        """d(validation loss at theta_K)/d ``targets``; frees the window's graph."""
        problem, first = self.problem, self._first
        assert self._params is not None and first is not None
        # This process's share of d L_val / d theta_K, carried back through the window.
        at_end, val_loss = problem.val_gradient(self._params, summed=False)
        with phase("window backward"):
            found = autograd.grad(
                list(self._params.values()),
                [*targets, *first.gradient.values()],
                grad_outputs=list(at_end.values()),
                allow_unused=True,
            )
        # Under data parallelism each process holds a part of the leaf's adjoint (see
        # metateach.distributed); their sum is the direction.
        later, adjoint = found[: len(targets)], sum_gradients(found[len(targets) :])
        direction = {
            k: torch.zeros_like(g) if a is None else a
            for (k, g), a in zip(first.gradient.items(), adjoint, strict=True)
        }
        mixed = mixed_gradient(
            problem,
            first.batch.x,
            problem.taught_of(first.batch, first.context),
            first.params,
            direction,
            targets,
            first.rng,
            first.record,
        )
        self.record(**self._meter.stop(), **{"teacher/val_loss": float(val_loss.detach())})
        self._params = self._state = self._first = None
        return tuple(_add(a, b) for a, b in zip(later, mixed, strict=True))


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
