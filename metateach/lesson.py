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
  is the log-probability of what it drew;
* ``step``, :class:`StepSettings` for the coming optimizer step: a
  learning-rate scale, weight decay by parameter, momentum (L2T's third
  kind of teaching, beside data and loss). Every route applies them to the
  real step and to its virtual and unrolled steps, differentiably.

:func:`lesson_loss` turns a lesson (or none) into the scalar the student
minimizes. No other code forms the student's training loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metateach.distributed import batch_sum
from metateach.student import StudentStates

__all__ = [
    "Lesson",
    "LossFn",
    "StepSettings",
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


@dataclass(frozen=True)
class StepSettings:
    """A lesson's settings for the student optimizer's coming step; each optional, each a
    0-dim tensor that may carry its graph to the teacher.

    * ``lr_scale`` multiplies the learning rate the schedule gives (> 0);
    * ``weight_decay`` replaces the optimizer's weight decay, by trainable parameter
      name (``student.named_parameters()``); a parameter not named keeps the
      optimizer's. Coupled (added to the gradient) or decoupled (AdamW) as the
      optimizer's own is;
    * ``momentum`` replaces momentum SGD's (``optim.name=sgd`` only).
    """

    lr_scale: Tensor | None = None
    weight_decay: Mapping[str, Tensor] | None = None
    momentum: Tensor | None = None

    def __post_init__(self) -> None:
        named = {"lr_scale": self.lr_scale, "momentum": self.momentum}
        named.update({f"weight_decay[{k}]": v for k, v in (self.weight_decay or {}).items()})
        for name, value in named.items():
            if value is not None and (not isinstance(value, Tensor) or value.dim() != 0):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"a lesson's step setting {name} must be a 0-dim tensor, got {shape}"
                )

    def detached(self) -> StepSettings:
        """The same settings without their graph."""
        return StepSettings(
            None if self.lr_scale is None else self.lr_scale.detach(),
            None
            if self.weight_decay is None
            else {k: v.detach() for k, v in self.weight_decay.items()},
            None if self.momentum is None else self.momentum.detach(),
        )

    def dot(self, adjoint: StepSettings) -> Tensor:
        """sum of value * adjoint over the settings both hold: the settings' share of a
        directional derivative, with the values' graph to the teacher (``adjoint`` detached)."""
        terms = []
        for mine, other in ((self.lr_scale, adjoint.lr_scale), (self.momentum, adjoint.momentum)):
            if mine is not None and other is not None:
                terms.append(mine * other.detach())
        for k, v in (self.weight_decay or {}).items():
            if adjoint.weight_decay is not None and k in adjoint.weight_decay:
                terms.append(v * adjoint.weight_decay[k].detach())
        return torch.stack(terms).sum() if terms else torch.zeros(())


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
    #: Settings for the optimizer's coming step, when the teacher teaches the step itself.
    step: StepSettings | None = None

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
