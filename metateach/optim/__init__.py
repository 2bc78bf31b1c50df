"""The student's optimizers as differentiable update rules (and SAM around them),
learning-rate schedules, and the learned LSTM optimizer."""

from metateach.optim.optimizers import (
    build_optimizer,
    build_rule,
    optimizer_from_config,
    rule_from_config,
)
from metateach.optim.rules import (
    MomentumSGD,
    RuleOptimizer,
    TorchoptRule,
    UpdateRule,
    momentum_sgd_step,
    recover_momentum,
    reverse_momentum_sgd,
    rule_of,
)
from metateach.optim.sam import SAM, sam_perturbation
from metateach.optim.schedules import (
    build_schedule,
    constant,
    cosine,
    schedule_from_config,
    set_lr,
    step_decay,
)

__all__ = [
    "SAM",
    "sam_perturbation",
    "UpdateRule",
    "MomentumSGD",
    "TorchoptRule",
    "RuleOptimizer",
    "rule_of",
    "momentum_sgd_step",
    "recover_momentum",
    "reverse_momentum_sgd",
    "build_rule",
    "build_optimizer",
    "rule_from_config",
    "optimizer_from_config",
    "build_schedule",
    "schedule_from_config",
    "constant",
    "cosine",
    "set_lr",
    "step_decay",
]
