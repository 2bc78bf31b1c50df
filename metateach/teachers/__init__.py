"""Teachers, registered by name so that ``teacher.name`` in a config selects one.

``none`` is the baseline every paper compares against: the student trains
alone. The published methods arrive one file each.
"""

from __future__ import annotations

from metateach.registry import TEACHERS
from metateach.teachers.constant import ConstantTeacher
from metateach.teachers.deep_interaction import DeepInteractionTeacher
from metateach.teachers.learning_to_reweight import LearningToReweight
from metateach.teachers.meta_weight_net import MetaWeightNet

__all__ = [
    "ConstantTeacher",
    "DeepInteractionTeacher",
    "LearningToReweight",
    "MetaWeightNet",
    "no_teacher",
]


@TEACHERS.register("none")
def no_teacher() -> None:
    """No teacher: plain training on the (possibly noisy) labels."""
    return None
