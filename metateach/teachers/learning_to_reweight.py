"""Learning to Reweight: weights from the validation loss's gradient, with no teacher parameters.

References:
    Ren, Zeng, Yang and Urtasun, "Learning to reweight examples for robust
    deep learning", ICML 2018.
"""

from __future__ import annotations

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import ExampleGradient, StudentView, Teacher

__all__ = ["LearningToReweight"]


@TEACHERS.register("learning_to_reweight")
class LearningToReweight(Teacher):
    """w_k = max(0, -d L_val / d eps_k) at eps = 0, normalized over the batch (Ren et al., Eq. 5-7).

    A sample whose up-weighting would raise the validation loss after one
    step gets weight 0; if none would lower it, the batch teaches nothing.
    """

    learns = ExampleGradient()

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        if view.example_grad is None:
            raise RuntimeError(
                "learning_to_reweight needs the engine's example gradients (view.example_grad)"
            )
        return Lesson.weighted((-view.example_grad).clamp(min=0))
