"""The student's optimizers, registered by name.

Weight decay is coupled (added to the gradient), PyTorch's and the papers'
convention; momentum follows PyTorch's v <- mu v + g, theta <- theta - lr v,
which is Eq. 2 of the deep-interaction paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from metateach.optim.sam import SAM
from metateach.registry import OPTIMIZERS

if TYPE_CHECKING:
    from metateach.config import OptimConfig

__all__ = ["build_optimizer", "optimizer_from_config"]


@OPTIMIZERS.register("sgd")
def sgd(
    params: Iterable[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    **_: object,
) -> torch.optim.Optimizer:
    """Momentum SGD (He et al., 2016)."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


@OPTIMIZERS.register("adam")
def adam(
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float,
    betas: list[float],
    eps: float,
    **_: object,
) -> torch.optim.Optimizer:
    """Adam (Kingma and Ba, 2015), as co-teaching trains its CNNs."""
    return torch.optim.Adam(
        params, lr=lr, betas=(betas[0], betas[1]), eps=eps, weight_decay=weight_decay
    )


def build_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    betas: list[float] | tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer registered as ``name``; each takes the settings it uses from the ``optim`` section."""
    return OPTIMIZERS.get(name)(
        params,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        betas=list(betas),
        eps=eps,
    )


def optimizer_from_config(
    settings: OptimConfig, params: Iterable[nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimizer an ``optim`` (or ``teacher.optim``) config section describes, with SAM around it if asked."""
    base = build_optimizer(
        settings.name,
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.nesterov,
        betas=settings.betas,
        eps=settings.eps,
    )
    if settings.sam.rho > 0:
        return SAM(base, settings.sam.rho, settings.sam.adaptive)
    return base
