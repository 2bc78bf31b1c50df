"""The student's optimizers (and SAM around them), learning-rate schedules, and the learned LSTM optimizer."""

from metateach.optim.optimizers import build_optimizer, optimizer_from_config
from metateach.optim.sam import SAM, sam_perturbation
from metateach.optim.schedules import build_schedule, constant, cosine, set_lr, step_decay

__all__ = [
    "SAM",
    "sam_perturbation",
    "build_optimizer",
    "optimizer_from_config",
    "build_schedule",
    "constant",
    "cosine",
    "set_lr",
    "step_decay",
]
