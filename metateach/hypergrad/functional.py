"""The functional core of the inner loop: pure functions over parameter dicts.

A student's state is a dict of parameters and a dict of momentum buffers;
:func:`momentum_sgd_step` maps one state to the next, differentiably. Its
arithmetic is PyTorch's ``torch.optim.SGD`` operation for operation, so a
step taken here equals a step of the student's real optimizer bit for bit
(``tests/test_functional.py`` checks both this and ``torchopt.sgd``).
TorchOpt's own functional SGD rounds differently, and has no inverse;
:func:`reverse_momentum_sgd` undoes a step, for the reversible method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from metateach.student import StudentStates

__all__ = [
    "Params",
    "momentum_sgd_step",
    "reverse_momentum_sgd",
    "recover_momentum",
    "decayed_gradients",
    "student_forward",
    "scratch_buffers",
    "dot",
]

Params = dict[str, Tensor]


def decayed_gradients(
    grads: Mapping[str, Tensor], params: Mapping[str, Tensor], weight_decay: float
) -> Params:
    """g + weight_decay * theta, PyTorch's coupled weight decay (``grad.add(param, alpha=wd)``)."""
    if weight_decay == 0:
        return dict(grads)
    return {k: grads[k].add(params[k], alpha=weight_decay) for k in grads}


def momentum_sgd_step(
    params: Mapping[str, Tensor],
    momentum: Mapping[str, Tensor | None],
    grads: Mapping[str, Tensor],
    lr: float,
    momentum_coef: float,
    weight_decay: float,
    nesterov: bool = False,
) -> tuple[Params, Params]:
    """One step of momentum SGD in PyTorch's convention; returns (new params, new momentum).

    d = g + lambda theta;  v' = mu v + d  (v' = d on the first step);  theta' = theta - lr v'
    (with ``nesterov``, theta' = theta - lr (d + mu v')).

    This is Eq. 2 of the deep-interaction paper. A ``None`` momentum entry
    means the first step. Differentiable in everything when the inputs carry
    graphs.
    """
    new_params: Params = {}
    new_momentum: Params = {}
    for name, d in decayed_gradients(grads, params, weight_decay).items():
        v = momentum.get(name)
        if momentum_coef == 0:
            v_new = d
        elif v is None:
            v_new = d.clone()
        else:
            v_new = v.mul(momentum_coef).add(d)
        new_momentum[name] = v_new
        direction = d.add(v_new, alpha=momentum_coef) if nesterov else v_new
        new_params[name] = params[name].add(direction, alpha=-lr)
    return new_params, new_momentum


def reverse_momentum_sgd(
    params_next: Mapping[str, Tensor], momentum_next: Mapping[str, Tensor], lr: float
) -> Params:
    """theta_t = theta_{t+1} + lr * v_{t+1}: the parameters before a momentum-SGD step."""
    return {k: params_next[k].add(momentum_next[k], alpha=lr) for k in params_next}


def recover_momentum(
    momentum_next: Mapping[str, Tensor], decayed_grads: Mapping[str, Tensor], momentum_coef: float
) -> Params:
    """v_t = (v_{t+1} - d_t) / mu: the momentum before a step, given the step's decayed gradient d_t."""
    return {k: (momentum_next[k] - decayed_grads[k]) / momentum_coef for k in momentum_next}


def student_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    buffers: Mapping[str, Tensor] | None = None,
) -> StudentStates:
    """The student's forward pass (with its internal states) at ``params``.

    Without ``buffers`` the module's own buffers are used, and a training-mode
    BatchNorm updates its running statistics in place: do that once per real
    step. Virtual and replayed passes give :func:`scratch_buffers` instead.
    """
    tensors = dict(params) if buffers is None else {**params, **buffers}
    return functional_call(model, tensors, (x,), {"return_states": True})


def scratch_buffers(model: nn.Module) -> Params:
    """Copies of the module's buffers, for forward passes that must leave the real ones alone."""
    return {k: b.clone() for k, b in model.named_buffers()}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """sum_k <a_k, b_k> over two parameter dicts."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def detached(tensors: Iterable[tuple[str, Tensor]]) -> Params:
    """name -> detached copy, for a state that must not carry a graph."""
    return {k: t.detach().clone() for k, t in tensors}
