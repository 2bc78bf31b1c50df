"""MentorNet-PD: a predefined curriculum over each sample's loss, against its running percentile.

References:
    Jiang, Zhou, Leung, Li and Fei-Fei, "MentorNet: Learning data-driven
    curriculum for very deep neural networks on corrupted labels", ICML 2018
    (Sec. 3, "MentorNet-PD"); the baseline of Tables 5 and 6 in Fan et al.
    (2020). The settings are those of the authors' CIFAR runs of MentorNet-PD
    (``mentornet_pd1_g_1``: percentile 0.75, gamma 1, example dropout 0.5 for
    the first 17% of training and 0.05 after, no burn-in beyond the curriculum's).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import FixedRule, StudentView, Teacher

__all__ = ["MentorNetPD", "predefined_curriculum"]


def predefined_curriculum(
    losses: Tensor, threshold: Tensor, progress: float, gamma: float = 1.0
) -> Tensor:
    """MentorNet-PD's target weights v*(loss, loss - lambda, epoch).

    Over the first 18% of training every sample counts (v = 1); until 90%,
    self-paced learning keeps the samples whose loss is at most the
    threshold lambda (v = 1[loss <= lambda]); after that, the linear
    self-paced curriculum v = clip(1 - (loss - lambda) / gamma, 0, 1)
    admits harder samples in part. ``progress`` is the fraction of training
    done; the curriculum reads it in whole percent, as MentorNet's epoch
    feature does.
    """
    percent = int(100 * progress)
    if percent <= 18:
        return torch.ones_like(losses)
    diff = losses - threshold
    if percent < 90:
        return (diff <= 0).to(losses.dtype)
    return (1 - diff / gamma).clamp(0, 1)


@TEACHERS.register("mentornet_pd")
class MentorNetPD(Teacher):
    """Weights from the predefined curriculum, with example dropout.

    The threshold lambda is an exponential moving average (``decay``) of the
    ``percentile``-th percentile of each training batch's losses, started at
    0 as the authors' code starts it. Example dropout (Liang et al. 2016, as
    MentorNet applies it) then zeroes the weights of a random share of the
    batch: ``dropout`` is a list of ``[rate, fraction of training]`` pieces,
    in order, whose fractions add up to 1.

    MentorNet-PD is a network trained beforehand to reproduce this
    curriculum from (loss, loss - lambda, label, epoch); this teacher applies
    the curriculum it reproduces, exactly, so no fitting error enters.
    The weights are not normalized: the student minimizes mean(v * loss),
    as in MentorNet's objective.

    Args:
        percentile: the loss percentile behind lambda, in (0, 1].
        gamma: the width of the linear curriculum's ramp, > 0.
        decay: lambda's moving-average decay, in [0, 1).
        dropout: ``[[rate, fraction], ...]``; rates in [0, 1).
    """

    learns = FixedRule()

    def __init__(
        self,
        percentile: float = 0.75,
        gamma: float = 1.0,
        decay: float = 0.9,
        dropout: Sequence[Sequence[float]] = ((0.5, 0.17), (0.05, 0.83)),
    ) -> None:
        super().__init__()
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {percentile}")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        pieces = [tuple(piece) for piece in dropout]
        if (
            not pieces
            or any(len(p) != 2 or not 0 <= p[0] < 1 or not p[1] > 0 for p in pieces)
            or abs(sum(p[1] for p in pieces) - 1) > 1e-6
        ):
            raise ValueError(
                "dropout must be [[rate, fraction], ...] with rates in [0, 1) and fractions > 0 "
                f"adding up to 1, got {[list(p) for p in pieces]}"
            )
        self.percentile = percentile
        self.gamma = gamma
        self.decay = decay
        self.dropout = pieces
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def dropout_rate(self, progress: float) -> float:
        """The share of each batch whose weights example dropout zeroes at this point of training."""
        end = 0.0
        for rate, fraction in self.dropout:
            end += fraction
            if progress < end:
                return rate
        return self.dropout[-1][0]

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        losses = view.losses.detach()
        with torch.no_grad():
            quantile = torch.quantile(losses.double(), self.percentile)
            self.threshold.mul_(self.decay).add_((1 - self.decay) * quantile)
            progress = view.context.progress
            weights = predefined_curriculum(
                losses, self.threshold.to(losses.dtype), progress, self.gamma
            )
            n = len(losses)
            kept = int(n * (1 - self.dropout_rate(progress)))
            dropped = torch.randperm(n, device=losses.device)[kept:]
            weights[dropped] = 0
        return Lesson(weights=weights)
