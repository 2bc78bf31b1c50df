"""L2T-DLF: a teacher that sets a parametric loss function's coefficients from the student's state.

References:
    Wu, Tian, Xia, Fan, Qin, Lai and Liu, "Learning to Teach with Dynamic
    Loss Functions", NeurIPS 2018 (the baseline of L2T-DLN's Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import Hypergradient, StudentView, Teacher, TeachingContext

__all__ = ["DynamicLossFunctionTeacher", "gated_cross_entropy"]


def gated_cross_entropy(logits: Tensor, targets: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """-2 sigmoid(e_y^T W p + b) log p_y per sample, with p the softmax of ``logits``.

    Wu et al.'s loss family: cross-entropy scaled by a gate that depends on
    the label and the whole prediction through the coefficients (W, b). The
    factor 2 makes W = 0, b = 0 exactly cross-entropy.
    """
    log_probs = logits.log_softmax(dim=1)
    gate = torch.sigmoid((w[targets] * log_probs.exp()).sum(dim=1) + b)
    return -2 * gate * log_probs.gather(1, targets[:, None]).squeeze(1)


@TEACHERS.register("l2t_dlf")
class DynamicLossFunctionTeacher(Teacher):
    """An MLP maps the student's state to the coefficients (W, b) of :func:`gated_cross_entropy`.

    The state is the normalized iteration, the running average training
    loss and the best validation accuracy so far. The output layer starts at
    zero, so teaching starts from cross-entropy. It learns by reverse-mode
    differentiation through the student's steps (``unrolled``; K = B = 15
    here, the same window as L2T-DLN's rounds).

    Args:
        num_classes: the size of W (classes x classes).
        hidden: the MLP's hidden width.
    """

    learns = Hypergradient("unrolled", inner_steps=15, backprop_steps=15)

    def __init__(self, num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        out = nn.Linear(hidden, num_classes * num_classes + 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), out)

    def coefficients(self, context: TeachingContext) -> tuple[Tensor, Tensor]:
        """(W, b) for the student's state in ``context``."""
        weight = self.net[0].weight
        out = self.net(context.history(weight.dtype, weight.device))
        c = self.num_classes
        return out[: c * c].view(c, c), out[c * c]

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        w, b = self.coefficients(view.context)

        def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
            return gated_cross_entropy(logits, targets, w.to(logits.dtype), b.to(logits.dtype))

        return Lesson(loss_fn=loss_fn)
