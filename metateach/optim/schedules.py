"""Learning-rate schedules as pure functions of the fractional epoch.

A schedule is a function ``(epoch: float) -> factor`` that multiplies the
base rate; the trainer evaluates it before every step. Having no state,
schedules need no checkpointing and a resumed run gets the same rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from metateach.registry import SCHEDULES

if TYPE_CHECKING:
    from metateach.config import ScheduleConfig

__all__ = [
    "build_schedule",
    "schedule_from_config",
    "step_decay",
    "cosine",
    "linear_decay",
    "constant",
    "set_lr",
]

Schedule = Callable[[float], float]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@SCHEDULES.register("constant")
def constant(total_epochs: int, **_: object) -> Schedule:
    """The base rate throughout."""
    return lambda epoch: 1.0


@SCHEDULES.register("step")
def step_decay(
    total_epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1, **_: object
) -> Schedule:
    """Multiply by ``gamma`` at each milestone epoch (He et al.: x0.1 at epochs 80 and 120)."""
    points = sorted(milestones)
    return lambda epoch: gamma ** bisect.bisect_right(points, epoch)


@SCHEDULES.register("cosine")
def cosine(total_epochs: int, min_factor: float = 0.0, **_: object) -> Schedule:
    """Half a cosine from 1 to ``min_factor`` over the run (Loshchilov and Hutter, 2017)."""
    return lambda epoch: (
        min_factor
        + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * min(epoch / total_epochs, 1.0)))
    )


@SCHEDULES.register("linear")
def linear_decay(
    total_epochs: int, milestones: Sequence[int] = (), min_factor: float = 0.0, **_: object
) -> Schedule:
    """The base rate until the first milestone (0 without one), then linearly down to ``min_factor`` at the end.

    Co-teaching's schedule (Han et al. 2018): Adam at 0.001, decayed linearly to 0 from epoch 80 of 200.
    """
    start = min(milestones, default=0)
    span = max(total_epochs - start, 1e-12)
    return lambda epoch: 1.0 - (1.0 - min_factor) * min(max(epoch - start, 0.0) / span, 1.0)


def schedule_from_config(settings: ScheduleConfig, epochs: int, base_lr: float) -> Schedule:
    """The schedule ``schedule`` in a config describes, over ``epochs``, for a base rate ``base_lr``."""
    return build_schedule(
        settings.name, epochs, milestones=settings.milestones, gamma=settings.gamma,
        min_factor=settings.min_lr / base_lr, warmup_epochs=settings.warmup_epochs,
    )  # fmt: skip


def build_schedule(
    name: str,
    total_epochs: int,
    *,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    min_factor: float = 0.0,
    warmup_epochs: float = 0.0,
) -> Schedule:
    """The schedule registered as ``name``, with an optional linear warm-up from 0 in front."""
    inner = SCHEDULES.get(name)(
        total_epochs, milestones=milestones, gamma=gamma, min_factor=min_factor
    )
    if warmup_epochs <= 0:
        return inner
    return lambda epoch: inner(epoch) * min(1.0, epoch / warmup_epochs)
