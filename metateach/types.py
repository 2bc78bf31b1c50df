"""The records that travel between the layers: what a teacher sees, what a step reports, the
student's parameters by name, a saved random state.

They depend on nothing of metateach, so that every module can name them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Params", "RNGState", "StepStats", "StudentView", "TeachingContext"]

#: The student's parameters (or their gradients, or an update rule's state
#: tensors) by name, as :func:`torch.func.functional_call` takes them.
Params = dict[str, Tensor]


class RNGState(NamedTuple):
    """PyTorch's random state at a moment: the CPU generator's, and the CUDA device's (or None)."""

    cpu: Tensor
    cuda: Tensor | None


class TeachingContext(NamedTuple):
    """Where the student is in its training, as the trainer knows it."""

    step: int  # student steps taken before this batch
    epoch: int  # the epoch in progress, from 0
    total_steps: int  # steps the whole run will take
    #: The batch losses' average so far, a 0-dim tensor: their mean since the student's
    #: first step, or an exponential average (``teacher.loss_average``).
    avg_train_loss: Tensor
    best_val_acc: float  # best validation accuracy so far (0 before the first evaluation)
    episode: int = 0  # which student of the run (train.episodes), from 0
    #: The norm of the gradient the student's last real step took (over all its trainable
    #: parameters, summed over processes, before weight decay), a 0-dim tensor; None
    #: before the episode's first step.
    grad_norm: Tensor | None = None

    @property
    def progress(self) -> float:
        """The normalized iteration, step / total steps, in [0, 1]."""
        return self.step / max(self.total_steps, 1)

    def history(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """[normalized iteration, average training loss, best validation accuracy]: the student's history."""
        return torch.stack(
            [
                torch.as_tensor(self.progress, dtype=dtype, device=device),
                self.avg_train_loss.to(device=device, dtype=dtype),
                torch.as_tensor(self.best_val_acc, dtype=dtype, device=device),
            ]
        )


class StudentView(NamedTuple):
    """What a teacher may look at: the student's forward pass on the batch, and its history.

    ``features`` is the second-to-last layer (the deep-interaction paper's
    I0) and ``maps`` the stages' outputs, shallow to deep. Unless the
    teacher learns with ``keep_weight_grad``, these tensors are detached
    from the student's parameters (the paper's dw/dtheta = 0).
    """

    logits: Tensor
    losses: Tensor  # per-sample cross-entropy on the labels the student is given
    features: Tensor
    maps: tuple[Tensor, ...]
    context: TeachingContext
    #: For teachers that declare :class:`ExampleGradient`: d L_val / d eps_k, the
    #: validation loss's sensitivity to each sample's weight after one step.
    example_grad: Tensor | None = None


class StepStats(NamedTuple):
    """What a training step reports, summed over its batch.

    A step returns them as one float64 tensor on the device (:meth:`stack`),
    in this order, so that steps add up there and are read (:meth:`read`)
    only at log points: reading every step would sync CPU and GPU each step.
    """

    loss_sum: float  # the sum of the per-sample cross-entropy on the given labels
    correct: float  # predictions that match the given label
    clean_correct: float  # predictions that match the true label of a (noisy) sample
    learned: float  # samples the student learned from (those the lesson kept)
    examined: float  # samples looked at for them (a refilling filter's candidates)

    @staticmethod
    def stack(*values: Tensor | float | int, device: torch.device) -> Tensor:
        """The fields' values, in order, as one float64 tensor on ``device``."""
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])

    @staticmethod
    def zeros(device: torch.device) -> Tensor:
        """No steps yet."""
        return torch.zeros(len(StepStats._fields), device=device, dtype=torch.float64)

    @classmethod
    def read(cls, stacked: Tensor) -> StepStats:
        """The fields of a stacked tensor (a device sync)."""
        return cls(*stacked.tolist())
