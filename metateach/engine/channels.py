"""Per-channel arithmetic for batch norm's derivative rules (:mod:`metateach.engine.tangent`,
:mod:`metateach.engine.second_order`): sums over every axis but the channel (axis 1), and
multiply-adds whose coefficients are one number a channel."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_channel", "channel_sum", "channel_dot", "scale_shift"]


def per_channel(t: Tensor, like: Tensor) -> Tensor:
    """A per-channel vector ``t`` shaped to broadcast against ``like`` (N, C, ...)."""
    return t.view([1, -1] + [1] * (like.dim() - 2))


def channel_sum(t: Tensor) -> Tensor:
    """S(t): the sum over every axis but the channel."""
    return t.sum([d for d in range(t.dim()) if d != 1])


def channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """S(a b), without the product as a tensor where the layout allows."""
    if a.is_contiguous() and b.is_contiguous():
        n, c = a.shape[:2]
        return torch.linalg.vecdot(a.view(n, c, -1), b.view(n, c, -1)).sum(0)
    return channel_sum(a * b)


def scale_shift(u: Tensor, scale: Tensor, shift: Tensor | None = None) -> Tensor:
    """u a + b, a = ``scale`` and b = ``shift`` per channel, as a new tensor to add to in place.

    Not ``torch.addcmul(b, u, a)``: with its first operand broadcast it took 2 to 4 times as
    long on the CPU (a ResNet-32 batch of 100: 463 us against 247 for u a + b + v c).
    """
    found = u * per_channel(scale, u)
    return found if shift is None else found.add_(per_channel(shift, u))
