"""Teachers, registered by name so that ``teacher.name`` in a config selects one.

The published methods arrive one file each. ``none`` is the baseline every
paper compares against: the student trains alone, all samples weighing the
same.
"""

from __future__ import annotations

from metateach.registry import TEACHERS

__all__ = ["no_teacher"]


@TEACHERS.register("none")
def no_teacher() -> None:
    """No teacher: plain training on the (possibly noisy) labels."""
    return None
