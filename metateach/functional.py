"""The functional core of the inner loop: the student's forward pass over parameter dicts.

The optimizer's step, as a pure function, is :mod:`metateach.optim.rules`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from metateach.student import StudentStates
from metateach.types import Params

__all__ = [
    "student_forward",
    "scratch_buffers",
    "dot",
]


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
