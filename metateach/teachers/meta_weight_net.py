"""Meta-Weight-Net: a small network that maps a sample's loss to its weight.

References:
    Shu, Xie, Yi, Zhao, Zhou, Xu and Meng, "Meta-Weight-Net: learning an
    explicit mapping for sample weighting", NeurIPS 2019.
"""

from __future__ import annotations

from torch import nn

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import Hypergradient, StudentView, Teacher

__all__ = ["MetaWeightNet"]


@TEACHERS.register("meta_weight_net")
class MetaWeightNet(Teacher):
    """w = sigmoid(MLP(loss)), an MLP 1-``hidden``-1 with a ReLU; weights normalized per batch.

    The input is each sample's cross-entropy under the student (detached).
    It learns by one-step lookahead, as in the paper.
    """

    learns = Hypergradient("lookahead")

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()
        )

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        losses = view.losses.unsqueeze(1).to(self.net[0].weight.dtype)
        return Lesson.weighted(self.net(losses).squeeze(1))
