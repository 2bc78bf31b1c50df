"""A teacher whose lesson is written by a learned optimizer, trained through unrolled rounds.

This is L2T-DLN's three levels. The student's parameters theta follow the
lesson; the lesson's own weights phi (a dynamic loss network) are updated
not by a gradient rule but by a learned optimizer (an LSTM, parameters psi)
that reads the validation gradient with respect to phi; psi is what the
teacher's optimizer trains.

One *round* is a window of K student steps (``inner_steps``) under fixed
phi, the last B of them differentiated (``backprop_steps``), as in
``unrolled``. At its end, with e the validation loss at theta_K:

    g = d e / d phi                    (the "state of the DLN")
    phi <- phi + LSTM_psi(g, memory)   (at the start of the next round)

Every ``rounds`` rounds the teacher's optimizer steps psi on the gradient
of the sum of the validation losses of those rounds, backpropagated
through the phi updates and the LSTM's memory (truncated BPTT, as in
Andrychowicz et al.), and the graph is cut there. Within a round the
student's starting point and the LSTM's gradient inputs are constants, as
in Andrychowicz et al. ("we drop the second derivatives"). Each round's
contribution d e_r / d psi = g_r^T d phi_r / d psi is taken at once (a
vector-Jacobian product through the phi updates), so only one round's
student graph is ever held.

References:
    Hai, Pan and Liu, "Learning to Teach Dynamic Loss Network", NeurIPS 2023
    (15 student steps a round, 10 rounds in the published code).
    Andrychowicz et al., "Learning to learn by gradient descent by gradient
    descent", NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metateach.data import Batch
from metateach.distributed import sum_gradients
from metateach.engine.problem import BilevelProblem
from metateach.engine.strategy import Differentiates
from metateach.hypergrad.unrolled import Unrolled
from metateach.registry import HYPERGRADS
from metateach.teacher import LearnedUpdates, Teacher, TeachingContext
from metateach.types import Params

__all__ = ["LearnedOptimizer"]


@HYPERGRADS.register("learned_optimizer")
class LearnedOptimizer(Unrolled):
    """Rounds of K student steps; the teacher's learned optimizer updates phi after each.

    Args:
        problem: the bilevel problem; its teacher must implement :class:`LearnedUpdates`.
        inner_steps: K, student steps a round.
        backprop_steps: B <= K, the steps of a round differentiated.
        rounds: rounds between steps of the learned optimizer's own parameters.
    """

    #: Each process's d e / d phi is its share: the learned optimizer reads their
    #: sum, and psi's gradient through phi is summed when the teacher steps.
    data_parallel = True
    differentiates = Differentiates.ROUNDS

    def __init__(
        self, problem: BilevelProblem, inner_steps: int, backprop_steps: int, rounds: int = 10
    ) -> None:
        super().__init__(problem, inner_steps, backprop_steps)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        assert isinstance(problem.teacher, LearnedUpdates)  # see refuses()
        self.teacher: LearnedUpdates = problem.teacher
        self.rounds = rounds
        self.rounds_done = 0
        #: The last round's d e / d phi, not yet read by the learned optimizer.
        self._pending: Params | None = None
        #: phi with its graph to psi since the last truncation, and psi's accumulated gradient.
        self._phi: Params | None = None
        self._psi_grads: list[Tensor] | None = None
        self._leaves: Params | None = None

    @classmethod
    def refuses(cls, teacher: Teacher | None) -> str | None:
        if isinstance(teacher, LearnedUpdates):
            return None
        return (
            "the learned_optimizer method needs a teacher whose lesson a learned optimizer "
            f"writes (such as l2t_dln); {type(teacher).__name__} is not one"
        )

    def can_checkpoint(self) -> bool:
        # Only between meta-windows does nothing live in a graph.
        return super().can_checkpoint() and self.position == 0 and self._phi is None

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        # The rounds of an unfinished window still teach the LSTM, and the final
        # checkpoint holds the final network, LSTM and memory.
        super().end_of_run(history, context)
        self._leaves = None
        if self._phi is not None:
            self._end_meta_window()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rounds_done": self.rounds_done, "pending": self._pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rounds_done = state["rounds_done"]
        pending = state["pending"]  # checkpoints load onto the CPU
        device = self.problem.device
        self._pending = None if pending is None else {k: v.to(device) for k, v in pending.items()}

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        if self.position == 0:
            self._begin_round()
        return super().step(batch, context)

    def _begin_round(self) -> None:
        """Apply the learned update the last round asked for; make phi a leaf to differentiate."""
        teacher = self.teacher
        source = self._phi if self._phi is not None else teacher.lesson_weights()
        if self._pending is not None:
            update = teacher.learned_update(self._pending)
            source = self._phi = {k: source[k] + update[k] for k in source}
            self._pending = None
        self._leaves = {k: v.detach().requires_grad_() for k, v in source.items()}
        teacher.use_lesson_weights(self._leaves)

    def _update_teacher(self) -> None:
        assert self._leaves is not None
        leaves = self._leaves
        grads = self.close_window(list(leaves.values()))
        g = {
            k: torch.zeros_like(leaf) if d is None else d
            for (k, leaf), d in zip(leaves.items(), grads, strict=True)
        }
        if self._phi is not None:  # this round's loss depends on psi through phi
            psi = self.problem.teacher_params()
            contribution = torch.autograd.grad(
                [self._phi[k] for k in leaves], psi, grad_outputs=list(g.values()),
                retain_graph=True, allow_unused=True,
            )  # fmt: skip
            previous = self._psi_grads or [torch.zeros_like(p) for p in psi]
            self._psi_grads = [
                a if d is None else a + d for a, d in zip(previous, contribution, strict=True)
            ]
        self.rounds_done += 1
        if self.rounds_done % self.rounds == 0:
            self._end_meta_window()
        self._pending = dict(zip(g, sum_gradients(list(g.values())), strict=True))
        self._leaves = None

    def _end_meta_window(self) -> None:
        """Step psi on the rounds' accumulated gradient, and cut every graph."""
        if self._psi_grads is not None:
            self.update_teacher(self._psi_grads)
        self._psi_grads = None
        if self._phi is not None:
            self.teacher.use_lesson_weights({k: v.detach() for k, v in self._phi.items()})
        self._phi = None
        self.teacher.truncate_memory()
