"""Batch norm with a fused double backward, for forward passes whose graph is differentiated twice.

A hypergradient through a student step differentiates the step's gradient:
a backward pass through the backward pass. PyTorch's rule for batch norm's
double backward (``NativeBatchNormBackwardBackward0``) is general and slow on
the CPU: on a ResNet-32 batch of 100 (16 x 32 x 32 maps) it takes about 20 ms
where the forward takes 1, about 190 elementwise products' worth, and it was
a third of ``unrolled``'s window end.

Inside :func:`second_order`, a training-mode batch norm (batch statistics) runs
as a :class:`torch.autograd.Function` whose forward and backward are PyTorch's
own kernels (``native_batch_norm`` and ``native_batch_norm_backward``: the same
values, the same running-statistics update) and whose backward's backward is
written out in closed form. With x^ = (x - m(x)) r the normalized input, r the
inverse standard deviation, m(.) the mean over all axes but the channel and
N the count it averages over, the backward is

    gx = g r (gy - m(gy) - x^ m(gy x^)),   gg = N m(gy x^),   gb = N m(gy).

Given the adjoints (A, a_g, a_b) of (gx, gg, gb), differentiating
<A, gx> + a_g gg + a_b gb gives, with S(u) = N m(u) the per-channel sum and
Q = S(A gy) - S(gy) S(A) / N - S(gy x^) S(A x^) / N,

    d/d gy = g r (A - m(A) - x^ m(A x^)) + a_g x^ + a_b,
    d/d g  = r Q,
    d/d x  = r (G - m(G) - x^ m(G x^)) - (g Q r^2 / N) x^,
    where G = -(g r / N) (gy S(A x^) + A S(gy x^)) + a_g gy

(the first term of d/dx carries x^'s dependence on x through m and r, the
second the explicit r of gx). m(G) and m(G x^) follow from the five sums
S(gy), S(A), S(gy x), S(A x), S(A gy), so each result is one multiply-add per
input with per-channel coefficients: about fifteen passes over the
activations in all. ``tests/test_second_order.py`` checks the rule against
PyTorch's in float64 (with ``gradgradcheck``) and the hypergradients that
use it against central differences.

The closed form is differentiable no further: a third derivative through it
raises rather than being silently wrong. Batch norm
in evaluation mode (running statistics) is affine in its input, and passes
through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.overrides import TorchFunctionMode

__all__ = ["second_order", "batch_norm"]


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum([d for d in range(t.dim()) if d != 1])


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """S(a b), per channel, without the product as a tensor where the layout allows."""
    if a.is_contiguous() and b.is_contiguous():
        n, c = a.shape[:2]
        return torch.linalg.vecdot(a.view(n, c, -1), b.view(n, c, -1)).sum(0)
    return _channel_sum(a * b)


class _BatchNormBackward(torch.autograd.Function):
    """(gy, x, weight) -> batch norm's (gx, gweight, gbias), by PyTorch's kernel; its backward is
    a :class:`_BatchNormDoubleBackward`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        gy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        eps: float,
        has_bias: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        ctx.save_for_backward(gy, x, weight, mean, invstd)
        mask = [True, weight is not None, has_bias]
        gx, gweight, gbias = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, eps, mask
        )
        return gx, gweight, gbias

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, a_x: Tensor, a_w: Tensor | None, a_b: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        gy, x, weight, mean, invstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        d_gy, d_x, d_w = _BatchNormDoubleBackward.apply(
            gy, x, weight, mean, invstd, a_x, a_w, a_b, needs
        )
        return d_gy, d_x, d_w, None, None, None, None


class _BatchNormDoubleBackward(torch.autograd.Function):
    """The closed form of the module docstring; a derivative of it raises.

    (``once_differentiable`` would not do: under ``autograd.grad`` with named
    inputs its error node is pruned, and the third derivative silently loses
    the term.)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        gy: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        a_x: Tensor,
        a_w: Tensor | None,
        a_b: Tensor | None,
        needs: tuple[bool, bool, bool],
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        need_gy, need_x, need_w = needs
        n = x.numel() // x.shape[1]
        r = invstd
        w = torch.ones_like(r) if weight is None else weight
        a_w = torch.zeros_like(r) if a_w is None else a_w
        a_b = torch.zeros_like(r) if a_b is None else a_b
        # The five sums; S(u x^) = r (S(u x) - mean S(u)).
        s_gy, s_a = _channel_sum(gy), _channel_sum(a_x)
        s_gy_hat = r * (_channel_dot(gy, x) - mean * s_gy)
        s_a_hat = r * (_channel_dot(a_x, x) - mean * s_a)
        d_gy = d_x = d_w = None
        # x^ = r x - r mean: a term c x^ is (c r) x - (c r mean).
        if need_gy:
            on_hat = a_w - w * r * s_a_hat / n
            constant = a_b - w * r * s_a / n - on_hat * r * mean
            d_gy = torch.addcmul(_per_channel(constant, x), _per_channel(w * r, x), a_x).addcmul_(
                _per_channel(on_hat * r, x), x
            )
        if need_x or (need_w and weight is not None):
            q = _channel_dot(a_x, gy) - (s_gy * s_a + s_gy_hat * s_a_hat) / n
            if need_w and weight is not None:
                d_w = r * q
        if need_x:
            # G = c_gy gy + c_a A; its sums follow from the five above.
            c_gy = a_w - w * r * s_a_hat / n
            c_a = -w * r * s_gy_hat / n
            mean_g = (c_gy * s_gy + c_a * s_a) / n
            mean_g_hat = (c_gy * s_gy_hat + c_a * s_a_hat) / n
            on_hat = -(r * mean_g_hat + w * q * r * r / n)
            constant = -r * mean_g - on_hat * r * mean
            d_x = (
                torch.addcmul(_per_channel(constant, x), _per_channel(r * c_gy, x), gy)
                .addcmul_(_per_channel(r * c_a, x), a_x)
                .addcmul_(_per_channel(on_hat * r, x), x)
            )
        return d_gy, d_x, d_w

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:  # type: ignore[override]
        raise RuntimeError(
            "metateach's batch norm (metateach.engine.second_order) has no third derivative; "
            "take the forward pass outside second_order() to use PyTorch's"
        )


class _BatchNorm(torch.autograd.Function):
    """Training-mode batch norm by PyTorch's kernels, its backward a :class:`_BatchNormBackward`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        # The running statistics are buffers outside the graph, updated in place as
        # F.batch_norm updates them.
        y, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps, ctx.has_bias)
        return gx, gw, gb, None, None, None, None


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """:func:`torch.nn.functional.batch_norm` with the fused double backward in training mode
    (batch statistics); otherwise, and for the inputs PyTorch refuses, PyTorch's own."""
    if training and input.dim() >= 2 and input.numel() > input.shape[1]:
        return _BatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


class _SecondOrder(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is F.batch_norm:
            return batch_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def second_order(enabled: bool = True) -> Iterator[None]:
    """Forward passes inside build graphs that will be differentiated twice: their training-mode
    batch norms take the fused double backward (see the module docstring). A no-op unless
    ``enabled``."""
    if not enabled:
        yield
        return
    with _SecondOrder():
        yield
