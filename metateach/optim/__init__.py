"""The student's optimizers and learning-rate schedules, registered by name."""

from metateach.optim.optimizers import build_optimizer, optimizer_from_config
from metateach.optim.schedules import build_schedule, constant, cosine, step_decay

__all__ = [
    "build_optimizer",
    "optimizer_from_config",
    "build_schedule",
    "constant",
    "cosine",
    "step_decay",
]
