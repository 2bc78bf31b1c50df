"""Label smoothing: cross-entropy against targets mixed with the uniform distribution.

References:
    Szegedy, Vanhoucke, Ioffe, Shlens and Wojna, "Rethinking the Inception
    architecture for computer vision", CVPR 2016, Sec. 7 (epsilon = 0.1).
    L2T-DLN's classification table compares against it ("Smooth").
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import FixedRule, StudentView, Teacher

__all__ = ["LabelSmoothing", "label_smoothing_loss"]


def label_smoothing_loss(logits: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """-sum_k q_k log p_k per sample, q = (1 - epsilon) one-hot(y) + epsilon / K;
    epsilon = 0 is cross-entropy."""
    log_p = F.log_softmax(logits, dim=1)
    on_target = log_p.gather(1, targets[:, None]).squeeze(1)
    return -(1 - epsilon) * on_target - epsilon * log_p.mean(1)


@TEACHERS.register("label_smoothing")
class LabelSmoothing(Teacher):
    """The lesson's loss function is cross-entropy on smoothed labels (a fixed rule)."""

    learns = FixedRule()

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0 <= epsilon < 1:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(loss_fn=partial(label_smoothing_loss, epsilon=self.epsilon))
