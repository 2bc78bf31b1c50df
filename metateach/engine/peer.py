"""Peer teaching: two students, each the other's teacher (co-teaching; SRIT when they use SAM).

References:
    Han, Yao, Yu, Niu, Xu, Hu, Tsang and Sugiyama, "Co-teaching: Robust
    training of deep neural networks with extremely noisy labels", NeurIPS 2018.
    "Sharpness Reduction Interactive Teaching" (SRIT), Algorithm 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metateach.data import Batch
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.strategy import TeachingStrategy
from metateach.lesson import Lesson, lesson_loss
from metateach.optim.schedules import set_lr
from metateach.registry import STRATEGIES
from metateach.teacher import PeerTeacher, TeachingContext

__all__ = ["PeerTeaching"]


@STRATEGIES.register("peer")
class PeerTeaching(TeachingStrategy):
    """Each step, the student f and the peer g each select for the other, then both step.

    On a batch D, f and g each take their (real) forward pass; f selects
    D_f and g selects D_g by the teacher's rule from their own losses
    (co-teaching: the R(T)|D| smallest). f then steps on D_g and g on D_f
    (Algorithm 1 of the SRIT paper, lines 6-13). Each network's step is
    its optimizer's: with SAM (``optim.sam.rho`` > 0) the perturbation
    epsilon = rho grad L(f, D_g) / ||grad L(f, D_g)|| and the gradient at
    w + epsilon are both taken on the peer's selection, which is SRIT.

    Both networks see the same batch, and neither's step changes what the
    other selects: the exchange is symmetric. Each epoch logs the label
    precision of both selections (the share of truly clean samples among
    those selected) and the keep ratio R(T).

    Args:
        problem: the student's problem; its teacher is the :class:`PeerTeacher`
            and its teacher optimizer the peer's (built from the run's ``optim``).
    """

    #: Both networks' steps sum their gradients over the processes; each
    #: process selects from its part of the batch (:mod:`metateach.distributed`).
    data_parallel = True

    def __init__(self, problem: BilevelProblem) -> None:
        super().__init__(problem)
        teacher = problem.teacher
        if not isinstance(teacher, PeerTeacher) or problem.teacher_optimizer is None:
            raise ValueError("peer teaching needs a PeerTeacher with an optimizer for its peer")
        self.teacher = teacher
        #: The peer's own problem: the same operations, on the peer, without a teacher.
        self.peer = BilevelProblem(
            student=teacher.peer,
            optimizer=problem.teacher_optimizer,
            teacher=None,
            teacher_optimizer=None,
            val_stream=None,
            clean_targets=problem.clean_targets,
        )

    def networks(self) -> dict[str, nn.Module]:
        return {"peer": self.teacher.peer}

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        student, peer = self.problem, self.peer
        # The peer follows the student's learning-rate schedule.
        set_lr(peer.optimizer, student.optimizer.param_groups[0]["lr"])
        rngs, passes = [], []
        for side in (student, peer):
            rngs.append(side.step_rng())
            passes.append(side.forward(side.params(), batch, context, real=True))
        (f_states, f_view), (g_states, g_view) = passes
        with torch.no_grad():
            self.teacher.observe(batch.index, (f_view.losses + g_view.losses) / 2, context)
            f_selects = self.teacher.select(f_view.losses, context)
            g_selects = self.teacher.select(g_view.losses, context)
        # The exchange: f learns from g's selection, g from f's.
        lessons = Lesson(mask=g_selects), Lesson(mask=f_selects)
        for side, states, view, lesson, rng in (
            (student, f_states, f_view, lessons[0], rngs[0]),
            (peer, g_states, g_view, lessons[1], rngs[1]),
        ):
            side.descend(
                TrainPass(lesson_loss(lesson, states, batch.y), states, view, lesson), batch, rng
            )
        clean = batch.y == student.clean_targets[batch.index]
        self.record(
            **{
                "peer/label_precision_student": _precision(f_selects, clean),
                "peer/label_precision_peer": _precision(g_selects, clean),
                "peer/keep_ratio": float(f_selects.float().mean()),
            }
        )
        return student.statistics(f_view, batch, lessons[0])


def _precision(selected: Tensor, clean: Tensor) -> float:
    """The share of clean samples among the selected ones."""
    return float((selected & clean).sum()) / max(int(selected.sum()), 1)
