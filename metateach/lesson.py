"""What a teacher gives the student for one batch, and the one place the
student's loss is computed from it.

A :class:`Lesson` may carry per-sample weights, a selection mask and a
replacement loss function, in any combination:

* ``weights`` multiply each sample's loss in the batch mean. Most teachers
  normalize them within the batch as their papers do (:meth:`Lesson.weighted`):
  they sum to the number of samples that count (Fan et al. 2020, Sec. 3.2), so
  a lesson of weights changes which samples matter, not the step size.
  Meta-Weight-Net, as its authors' stable code, gives them as they are;
* ``mask`` selects samples (a data filter, or co-teaching's small-loss set);
* ``loss_fn`` maps (logits, targets) to per-sample losses and replaces
  cross-entropy (a learned loss, as in L2T-DLN); a :class:`StatesLoss` maps
  the student's states (features, the head's weight) instead, for losses on
  more than the logits (large-margin softmax);
* ``log_prob``, for a teacher that samples its lesson (L2T's data filter),
  is the log-probability of what it drew.

:func:`lesson_loss` turns a lesson (or none) into the scalar the student
minimizes. No other code forms the student's training loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metateach.distributed import batch_sum
from metateach.student import StudentStates

__all__ = [
    "Lesson",
    "LossFn",
    "StatesLoss",
    "normalize_weights",
    "lesson_loss",
    "per_sample_losses",
]


@dataclass(frozen=True)
class StatesLoss:
    """A lesson's loss function of the student's whole forward pass: ``fn(states, targets)`` ->
    per-sample losses, ``states`` a :class:`~metateach.student.StudentStates` (logits,
    features, maps, the head's weight).

    Every route differentiates it as it does a loss of the logits: the states
    carry their graph to the parameters, and in forward mode the head's weight
    carries its tangent. The diagnostics draw no loss curve for it (it is not
    a function of the logits alone).
    """

    fn: Callable[[StudentStates, Tensor], Tensor]

    def __call__(self, states: StudentStates, targets: Tensor) -> Tensor:
        return self.fn(states, targets)


LossFn = Callable[[Tensor, Tensor], Tensor] | StatesLoss


def normalize_weights(raw: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scale non-negative weights so that they sum to the number of (selected) samples.

    ``w_k * n / sum_j w_j`` over the selected samples; masked-out samples get
    weight 0. A batch whose weights are all zero stays all zero (no sample
    counts) rather than dividing by zero. The sums span the global batch
    when it is sharded over processes (:mod:`metateach.distributed`).
    """
    if mask is not None:
        raw = raw * mask.to(raw.dtype)
        count = mask.sum().to(raw.dtype)
    else:
        count = torch.tensor(float(raw.shape[0]), dtype=raw.dtype, device=raw.device)
    total, count = batch_sum(raw.sum()), batch_sum(count)
    return torch.where(
        total > 0, raw * (count / total.clamp(min=torch.finfo(raw.dtype).tiny)), raw * 0
    )


@dataclass
class Lesson:
    """Per-sample ``weights`` (as the loss uses them), a boolean ``mask``, a ``loss_fn``; each optional."""

    weights: Tensor | None = None
    mask: Tensor | None = None
    loss_fn: LossFn | None = None
    #: A sampling teacher's log-probability of the lesson it drew (a scalar with
    #: its graph to the teacher): what policy-gradient learning differentiates.
    log_prob: Tensor | None = None

    @classmethod
    def weighted(
        cls, raw: Tensor, mask: Tensor | None = None, loss_fn: LossFn | None = None
    ) -> Lesson:
        """A lesson from raw non-negative weights, normalized with :func:`normalize_weights`."""
        return cls(normalize_weights(raw, mask), mask, loss_fn)

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask.dtype != torch.bool:
            raise TypeError(f"a lesson's mask must be boolean, got {self.mask.dtype}")
        for name in ("weights", "mask"):
            value = getattr(self, name)
            if value is not None and value.dim() != 1:
                raise ValueError(
                    f"a lesson's {name} must be one value per sample, got shape {tuple(value.shape)}"
                )


def per_sample_losses(
    lesson: Lesson | None, outputs: Tensor | StudentStates, targets: Tensor
) -> Tensor:
    """The lesson's loss function on each sample, cross-entropy when it names none.

    ``outputs`` are the student's logits, or its states (which a
    :class:`StatesLoss` needs).
    """
    logits = outputs.logits if isinstance(outputs, StudentStates) else outputs
    loss_fn = None if lesson is None else lesson.loss_fn
    if isinstance(loss_fn, StatesLoss):
        if not isinstance(outputs, StudentStates):
            raise TypeError(
                f"the lesson's loss ({loss_fn.fn!r}) reads the student's states, and this "
                "route passed its logits only"
            )
        return loss_fn(outputs, targets)
    if loss_fn is not None:
        return loss_fn(logits, targets)
    return F.cross_entropy(logits, targets, reduction="none")


def lesson_loss(lesson: Lesson | None, outputs: Tensor | StudentStates, targets: Tensor) -> Tensor:
    """The scalar the student minimizes on a batch under ``lesson``; ``outputs`` as in
    :func:`per_sample_losses`.

    ``sum_k m_k w_k l_k / sum_k m_k`` with weights w (1 without any), mask m
    (1 without one) and per-sample losses l. Without a lesson this is the
    mean cross-entropy, computed the same way, so that a lesson of all-one
    weights gives bit for bit the same loss and gradients as no lesson. With the
    batch sharded over processes, the count is the global batch's, so each
    process's loss is its share of the whole (:mod:`metateach.distributed`).
    """
    losses = per_sample_losses(lesson, outputs, targets)
    count = losses.new_tensor(float(losses.shape[0]))
    if lesson is not None:
        if lesson.weights is not None:
            losses = lesson.weights * losses
        if lesson.mask is not None:
            # where, not a product: a dropped sample's inf or nan must not leak in.
            losses = torch.where(lesson.mask, losses, torch.zeros_like(losses))
            count = lesson.mask.sum().to(losses.dtype)
    # Clamped once summed: a process whose part keeps no sample still counts none.
    return losses.sum() / batch_sum(count).clamp(min=1)
