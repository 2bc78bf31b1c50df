"""The student's optimizers, registered by name: each builds an :class:`~metateach.optim.rules.UpdateRule`.

``sgd`` is PyTorch's momentum SGD (v <- mu v + g, theta <- theta - lr v,
Eq. 2 of the deep-interaction paper), bit for bit; the others are
TorchOpt's functional optimizers, each equal to the ``torch.optim`` class
of its name (``tests/test_rules.py`` compares 100 float64 steps). Weight
decay is coupled (added to the gradient) except in ``adamw``, where it is
decoupled, as PyTorch and TorchOpt define them. ``optim.momentum`` is the
momentum of any optimizer that has one (SGD, RMSprop); what only one
optimizer has (RMSprop's ``alpha``, Adadelta's ``rho``, ...) is an entry
of ``optim.kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torchopt
from torch import Tensor, nn

from metateach.optim.rules import MomentumSGD, RuleOptimizer, TorchoptRule, UpdateRule
from metateach.optim.sam import SAM
from metateach.registry import OPTIMIZERS

if TYPE_CHECKING:
    from metateach.config import OptimConfig

__all__ = [
    "build_rule",
    "build_optimizer",
    "rule_from_config",
    "optimizer_from_config",
    "COMMON_SETTINGS",
]

#: The ``optim`` settings every optimizer is offered; each takes those it names.
COMMON_SETTINGS = ("momentum", "weight_decay", "nesterov", "betas", "eps")

#: TorchOpt's ``eps_root`` unless set: sqrt(v + eps_root) has a finite derivative where a
#: gradient coordinate has been zero since the start (sqrt's is infinite at 0, and a
#: hypergradient through it nan); it moves no step of a float32 or float64 student
#: measurably. ``optim.kwargs.eps_root=0`` is PyTorch's arithmetic exactly.
EPS_ROOT = 1e-30


@OPTIMIZERS.register("sgd")
def sgd(momentum: float, weight_decay: float, nesterov: bool, **_: object) -> UpdateRule:
    """Momentum SGD (He et al., 2016), PyTorch's ``torch.optim.SGD``; invertible without Nesterov."""
    return MomentumSGD(momentum, weight_decay, nesterov)


def _adam(
    name: str,
    functional: Callable[..., torchopt.base.GradientTransformation],
    reference: type[torch.optim.Optimizer],
    weight_decay: float,
    betas: list[float],
    eps: float,
    eps_root: float,
    stationary_decay: float | None,
) -> UpdateRule:
    """Adam or AdamW, which keep the same moments under the same names."""
    b = (betas[0], betas[1])
    return TorchoptRule(
        name,
        functional(1.0, b, eps, weight_decay, eps_root=eps_root),
        {"mu": "exp_avg", "nu": "exp_avg_sq"},
        lambda p, lr: reference(p, lr, b, eps, weight_decay),
        stationary_decay,
        weight_decay,
        decoupled=name == "adamw",
    )


@OPTIMIZERS.register("adam")
def adam(
    weight_decay: float, betas: list[float], eps: float, eps_root: float = EPS_ROOT, **_: object
) -> UpdateRule:
    """Adam (Kingma and Ba, 2015) with coupled weight decay, ``torch.optim.Adam``."""
    return _adam(
        "adam", torchopt.adam, torch.optim.Adam, weight_decay, betas, eps, eps_root, weight_decay
    )


@OPTIMIZERS.register("adamw")
def adamw(
    weight_decay: float, betas: list[float], eps: float, eps_root: float = EPS_ROOT, **_: object
) -> UpdateRule:
    """AdamW (Loshchilov and Hutter, 2019): Adam with decoupled weight decay, ``torch.optim.AdamW``
    (whose resting point is no regularized loss's stationary point unless the decay is 0)."""
    decay = 0.0 if weight_decay == 0 else None
    return _adam(
        "adamw", torchopt.adamw, torch.optim.AdamW, weight_decay, betas, eps, eps_root, decay
    )


@OPTIMIZERS.register("rmsprop")
def rmsprop(
    momentum: float,
    weight_decay: float,
    eps: float,
    alpha: float = 0.99,
    centered: bool = False,
    **_: object,
) -> UpdateRule:
    """RMSprop (Tieleman and Hinton, 2012), ``torch.optim.RMSprop``, with ``optim.momentum``
    (set it to 0 for RMSprop without momentum, PyTorch's default)."""
    return TorchoptRule(
        "rmsprop",
        torchopt.rmsprop(1.0, alpha, eps, weight_decay, momentum, centered=centered),
        {"nu": "square_avg", "mu": "grad_avg", "trace": "momentum_buffer"},
        lambda p, lr: torch.optim.RMSprop(p, lr, alpha, eps, weight_decay, momentum, centered),
        stationary_decay=weight_decay,
        weight_decay=weight_decay,
    )


@OPTIMIZERS.register("adagrad")
def adagrad(
    weight_decay: float,
    eps: float,
    lr_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    **_: object,
) -> UpdateRule:
    """Adagrad (Duchi et al., 2011), ``torch.optim.Adagrad``."""
    return TorchoptRule(
        "adagrad",
        torchopt.adagrad(1.0, lr_decay, weight_decay, initial_accumulator_value, eps),
        {"sum_of_squares": "sum"},
        lambda p, lr: torch.optim.Adagrad(
            p, lr, lr_decay, weight_decay, initial_accumulator_value, eps
        ),
        stationary_decay=weight_decay,
        weight_decay=weight_decay,
    )


@OPTIMIZERS.register("adadelta")
def adadelta(weight_decay: float, eps: float, rho: float = 0.9, **_: object) -> UpdateRule:
    """Adadelta (Zeiler, 2012), ``torch.optim.Adadelta``."""
    return TorchoptRule(
        "adadelta",
        torchopt.adadelta(1.0, rho, eps, weight_decay),
        {"mu": "square_avg", "nu": "acc_delta"},
        lambda p, lr: torch.optim.Adadelta(p, lr, rho, eps, weight_decay),
        stationary_decay=weight_decay,
        weight_decay=weight_decay,
    )


def build_rule(
    name: str,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    betas: list[float] | tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    kwargs: Mapping[str, Any] | None = None,
) -> UpdateRule:
    """The update rule registered as ``name``, with the settings it takes and its own ``kwargs``."""
    return OPTIMIZERS.get(name)(
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        betas=list(betas),
        eps=eps,
        **dict(kwargs or {}),
    )


def build_optimizer(
    name: str, params: Iterable[nn.Parameter | Tensor], *, lr: float, **settings: Any
) -> torch.optim.Optimizer:
    """A :class:`~metateach.optim.rules.RuleOptimizer` stepping with the rule ``name``
    (settings as in :func:`build_rule`)."""
    return RuleOptimizer(params, build_rule(name, **settings), lr)


def rule_from_config(settings: OptimConfig) -> UpdateRule:
    """The update rule an ``optim`` config section names, with its settings."""
    return build_rule(
        settings.name,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.nesterov,
        betas=settings.betas,
        eps=settings.eps,
        kwargs=settings.kwargs,
    )


def optimizer_from_config(
    settings: OptimConfig, params: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimizer an ``optim`` (or ``teacher.optim``) config section describes, with SAM around it if asked."""
    base = RuleOptimizer(params, rule_from_config(settings), settings.lr)
    if settings.sam.rho > 0:
        return SAM(base, settings.sam.rho, settings.sam.adaptive)
    return base
