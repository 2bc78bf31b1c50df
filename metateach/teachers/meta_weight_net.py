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
    """w = sigmoid(MLP(loss)), an MLP 1-``hidden``-1 with a ReLU.

    The input is each sample's cross-entropy under the student (detached).
    It learns by one-step lookahead, as in the paper.

    ``normalize=False`` (the default) trains the student on the batch mean of
    w_i * loss_i, as the authors' noisy-label code that they call stable
    (``MW-Net.py``) does. With ``normalize=True`` the weights are scaled to
    sum to the batch size, as their first release
    (``train_WRN-28-10_Meta_PGC.py``) and their class-imbalance code do.
    Normalized weights let the network zero most of a batch and multiply the
    step on the rest: under 40% MNIST label noise that diverged in 3 of 4
    runs (docs/results.md, "Noisy labels").
    """

    learns = Hypergradient("lookahead")

    def __init__(self, hidden: int = 100, normalize: bool = False) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid()
        )

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        losses = view.losses.unsqueeze(1).to(self.net[0].weight.dtype)
        weights = self.net(losses).squeeze(1)
        return Lesson.weighted(weights) if self.normalize else Lesson(weights=weights)
