"""Self-paced learning: train on the easy samples first, admitting harder ones as training goes on.

References:
    Kumar, Packer and Koller, "Self-paced learning for latent variable
    models", NeurIPS 2010.
"""

from __future__ import annotations

import torch

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import FixedRule, StudentView, Teacher

__all__ = ["SelfPacedLearning"]


@TEACHERS.register("self_paced")
class SelfPacedLearning(Teacher):
    """Keep the samples whose loss is below a hardness threshold that grows with training.

    The threshold is the ``pace``-quantile of the batch's losses, where the
    pace grows linearly from ``start`` at the first step to 1 (every sample)
    at the fraction ``full_at`` of training. Measuring the threshold in
    quantiles rather than in loss units keeps it meaningful whatever the
    loss's scale; it still rises with the pace, as Kumar et al.'s 1/K does.

    Args:
        start: the share of each batch kept at the start, in (0, 1].
        full_at: the fraction of training after which all samples are kept, in (0, 1].
    """

    learns = FixedRule()

    def __init__(self, start: float = 0.5, full_at: float = 0.5) -> None:
        super().__init__()
        if not 0 < start <= 1 or not 0 < full_at <= 1:
            raise ValueError(
                f"start and full_at must be in (0, 1], got start={start}, full_at={full_at}"
            )
        self.start = start
        self.full_at = full_at

    def pace(self, progress: float) -> float:
        """The share of each batch kept at this point of training."""
        return min(1.0, self.start + (1 - self.start) * progress / self.full_at)

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        threshold = torch.quantile(view.losses.float(), self.pace(view.context.progress))
        return Lesson(mask=view.losses <= threshold.to(view.losses.dtype))
