"""Focal loss: down-weight the samples the student already gets right.

References:
    Lin, Goyal, Girshick, He and Dollar, "Focal loss for dense object
    detection", ICCV 2017. The deep-interaction paper compares against it
    with gamma in {0.5, 1, 2}.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import FixedRule, StudentView, Teacher

__all__ = ["FocalLoss", "focal_loss"]


def focal_loss(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    """-(1 - p_y)^gamma log p_y per sample; gamma = 0 is cross-entropy."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    return -((1 - log_p.exp()) ** gamma) * log_p


@TEACHERS.register("focal")
class FocalLoss(Teacher):
    """The lesson's loss function is the focal loss with exponent ``gamma`` (a fixed rule)."""

    learns = FixedRule()

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(loss_fn=partial(focal_loss, gamma=self.gamma))
