"""Random filtering: L2T's RandTeach baseline.

References:
    Fan, Tian, Qin, Li and Liu, "Learning to Teach", ICLR 2018 (RandTeach).
"""

from __future__ import annotations

import torch

from metateach.data import Batch, derive_seed
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import FixedRule, StudentView, Teacher

__all__ = ["RandomFilter"]


@TEACHERS.register("random_filter")
class RandomFilter(Teacher):
    """Keep each sample with probability ``keep``, independently.

    The draws come from a generator seeded by (``seed``, step), not from the
    run's random stream: a resumed run filters exactly as before.
    """

    learns = FixedRule()

    def __init__(self, keep: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        self.keep = keep
        self.seed = seed

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, view.context.step))
        draws = torch.rand(len(batch.y), generator=generator).to(view.losses.device)
        return Lesson(mask=draws < self.keep)
