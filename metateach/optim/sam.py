"""Sharpness-Aware Minimization around any base optimizer.

References:
    Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021.
    Kwon, Kim, Park and Choi, "ASAM: Adaptive Sharpness-Aware Minimization
    for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["SAM", "sam_perturbation"]


def sam_perturbation(
    params: Sequence[Tensor], grads: Sequence[Tensor], rho: float, adaptive: bool = False
) -> list[Tensor]:
    """epsilon = rho g / ||g|| (SAM), or rho T^2 g / ||T g|| with T = |w| (ASAM).

    The norm is taken over all parameters together. A zero gradient gives
    a zero perturbation.
    """
    scaled = [g * p.abs() if adaptive else g for p, g in zip(params, grads, strict=True)]
    norm = torch.sqrt(sum((s.double().square().sum() for s in scaled), torch.zeros(())))
    factor = rho / norm.clamp(min=1e-12)
    return [
        (s * p.abs() if adaptive else s) * factor.to(s.dtype)
        for p, s in zip(params, scaled, strict=True)
    ]


class SAM(torch.optim.Optimizer):
    """SAM's two-pass step around ``base``: perturb, take the gradient there, restore, step.

    The caller (:meth:`metateach.engine.BilevelProblem.real_step`) runs
    the passes: :meth:`perturb` with the gradient at w, a second forward
    and backward at w + epsilon, :meth:`restore`, then :meth:`step` with
    that second gradient in ``.grad``. The base optimizer's state and
    parameter groups are SAM's, so schedules and checkpoints see one
    optimizer.

    Args:
        base: the optimizer that takes the step (SGD, Adam, ...).
        rho: the neighbourhood radius; 0 makes every step the base step.
        adaptive: ASAM's scale-invariant neighbourhood.
    """

    def __init__(self, base: torch.optim.Optimizer, rho: float, adaptive: bool = False) -> None:
        if rho < 0:
            raise ValueError(f"rho must be >= 0, got {rho}")
        self.base, self.rho, self.adaptive = base, rho, adaptive
        self.defaults = base.defaults
        self._origin: list[Tensor] | None = None  # w while the parameters sit at w + epsilon
        # Hooks and the rest of the Optimizer machinery act on the base.
        self._optimizer_step_pre_hooks = base._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = base._optimizer_step_post_hooks

    # The base's, read through: its load_state_dict replaces both objects.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        return self.base.state

    def params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def perturb(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """Move the parameters to w + epsilon for the gradient ``grads``; returns epsilon."""
        params = self.params()
        self._origin = [p.detach().clone() for p in params]
        perturbation = sam_perturbation(params, grads, self.rho, self.adaptive)
        for p, e in zip(params, perturbation, strict=True):
            p.add_(e)
        return perturbation

    @torch.no_grad()
    def restore(self) -> None:
        """Back to w exactly (w + epsilon - epsilon need not be w in floating point)."""
        assert self._origin is not None, "restore() without perturb()"
        for p, w in zip(self.params(), self._origin, strict=True):
            p.copy_(w)
        self._origin = None

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return self.base.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def state_dict(self):  # type: ignore[no-untyped-def, override]
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:  # type: ignore[no-untyped-def, override]
        self.base.load_state_dict(state_dict)
