"""L2T's refill: a batch filled with the samples a filtering teacher keeps (``teacher.refill``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metateach.data import Batch
from metateach.types import TeachingContext

if TYPE_CHECKING:
    from metateach.engine.problem import BilevelProblem

__all__ = ["refilled", "MAX_REFILLS"]

#: Candidate batches a refilled batch may draw beyond the first (``teacher.refill``).
MAX_REFILLS = 100


def refilled(
    problem: BilevelProblem, batch: Batch, context: TeachingContext, teacher_grad: bool
) -> tuple[Batch, Tensor | None, int]:
    """A full batch of samples the teacher keeps: from ``batch``, then from the refill stream.

    Each candidate batch is shown to the teacher with the student's view
    of it (a pass on scratch BatchNorm buffers); the kept samples gather
    until there are ``len(batch)`` (L2T's "refilled until M are kept").
    Returns them, the summed log-probability of every decision (None
    when the lessons carry none), with its graph to the teacher when
    ``teacher_grad``, and the number of candidates examined.
    """
    assert problem.refill is not None
    size, kept, examined, parts = len(batch.y), 0, 0, []
    log_prob: Tensor | None = None
    for _ in range(MAX_REFILLS + 1):
        with torch.no_grad():
            _, view = problem.forward(problem.params(), batch, context, real=False)
        lesson = problem.lesson(batch, view, teacher_grad)
        if lesson is None or lesson.mask is None:
            raise RuntimeError("teacher.refill needs a teacher whose lessons are masks")
        if lesson.log_prob is not None:
            log_prob = lesson.log_prob if log_prob is None else log_prob + lesson.log_prob
        parts.append(Batch(*(t[lesson.mask] for t in batch)))
        kept += int(lesson.mask.sum())
        examined += len(batch.y)
        if kept >= size:
            break
        batch = problem.refill.next()
    if kept == 0:
        raise RuntimeError(f"the teacher kept no sample of {MAX_REFILLS + 1} batches")
    full = Batch(*(torch.cat(t)[:size] for t in zip(*parts, strict=True)))
    return full, log_prob, examined
