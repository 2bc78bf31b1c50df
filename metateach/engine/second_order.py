"""Batch norm and convolutions with fused double backwards, for forward passes whose graph is
differentiated twice.

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
input with per-channel coefficients: about ten passes over the activations
in all. ``tests/test_second_order.py`` checks the rules against PyTorch's in
float64 (with ``gradgradcheck``); ``tests/test_check.py`` checks the
hypergradients that use them against central differences.

Convolutions (``conv1d``/``2d``/``3d``) likewise run PyTorch's kernels
forward and backward, and their double backward as the four convolution
kernels it needs (:class:`_ConvDoubleBackward`), terms of absent adjoints
skipped: PyTorch's rule took 1.3 to 2 times as long on ResNet-32's layers.

The double backwards are differentiable no further: a third derivative
through them raises rather than being silently wrong. Batch norm in
evaluation mode (running statistics) is affine in its input, and passes
through unchanged, as do convolutions with string padding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.overrides import TorchFunctionMode

from metateach.engine.channels import channel_dot, channel_sum, per_channel, scale_shift

__all__ = ["second_order", "batch_norm", "conv"]

_NO_THIRD = (
    "metateach's batch norm and convolutions (metateach.engine.second_order) have no third "
    "derivative; take the forward pass outside second_order() to use PyTorch's"
)


class _DoubleBackward(torch.autograd.Function):
    """A double backward in closed form: differentiating it raises (see the module docstring)."""

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[None, ...]:  # type: ignore[override]
        raise RuntimeError(_NO_THIRD)


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


class _BatchNormDoubleBackward(_DoubleBackward):
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
        s_gy, s_a = channel_sum(gy), channel_sum(a_x)
        s_gy_hat = r * (channel_dot(gy, x) - mean * s_gy)
        s_a_hat = r * (channel_dot(a_x, x) - mean * s_a)
        d_gy = d_x = d_w = None
        # x^ = r x - r mean: a term c x^ is (c r) x - (c r mean).
        if need_gy:
            on_hat = a_w - w * r * s_a_hat / n
            constant = a_b - w * r * s_a / n - on_hat * r * mean
            d_gy = scale_shift(a_x, w * r, constant).addcmul_(per_channel(on_hat * r, x), x)
        if need_x or (need_w and weight is not None):
            q = channel_dot(a_x, gy) - (s_gy * s_a + s_gy_hat * s_a_hat) / n
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
                scale_shift(gy, r * c_gy, constant)
                .addcmul_(per_channel(r * c_a, x), a_x)
                .addcmul_(per_channel(on_hat * r, x), x)
            )
        return d_gy, d_x, d_w


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


class _ConvSpec(NamedTuple):
    """A convolution's geometry, as PyTorch's convolution operators take it."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int

    def args(self) -> tuple[Any, ...]:
        """The arguments after the tensors, of torch.convolution and aten.convolution_backward."""
        zeros = [0] * len(self.stride)
        return self.stride, self.padding, self.dilation, False, zeros, self.groups


class _ConvBackward(torch.autograd.Function):
    """(gy, x, weight) -> a convolution's (gx, gweight, gbias) (those ``mask`` asks for), by
    PyTorch's kernel; its backward is a :class:`_ConvDoubleBackward`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        gy: Tensor,
        x: Tensor,
        weight: Tensor,
        mask: tuple[bool, bool, bool],
        spec: _ConvSpec,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        ctx.save_for_backward(gy, x, weight)
        ctx.spec = spec
        ctx.set_materialize_grads(False)
        bias_sizes = [weight.shape[0]] if mask[2] else None
        gx, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, weight, bias_sizes, *spec.args(), list(mask)
        )
        return gx, gw, gb

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, a_x: Tensor | None, a_w: Tensor | None, a_b: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        gy, x, weight = ctx.saved_tensors
        d_gy, d_x, d_w = _ConvDoubleBackward.apply(gy, x, weight, a_x, a_w, a_b, ctx.spec)
        return d_gy, d_x, d_w, None, None


class _ConvDoubleBackward(_DoubleBackward):
    """A convolution's backward differentiated: a convolution kernel for each term whose
    adjoint is present, four at most.

    gx = C*(gy; W), gW = C_W*(x; gy) and gb = S(gy) are linear in gy, and gx in
    W, gW in x: with the adjoints (A_x, A_W, a_b),

        d/d gy = C(A_x; W) + C(x; A_W) + a_b,  d/d x = C*(gy; A_W),  d/d W = C_W*(A_x; gy),

    C the convolution, C* its input gradient and C_W* its weight gradient.
    PyTorch's rule computes the same; this one runs each on PyTorch's
    convolution kernels directly and skips the terms of absent adjoints. A
    derivative of it raises.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        gy: Tensor,
        x: Tensor,
        weight: Tensor,
        a_x: Tensor | None,
        a_w: Tensor | None,
        a_b: Tensor | None,
        spec: _ConvSpec,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        backward = torch.ops.aten.convolution_backward
        d_gy = d_x = d_w = None
        if need_gy:
            terms = [
                torch.convolution(a, w, None, *spec.args())
                for a, w in ((a_x, weight), (x, a_w))
                if a is not None and w is not None
            ]
            if a_b is not None:
                terms.append(per_channel(a_b, gy).expand_as(gy))
            d_gy = sum(terms[1:], terms[0]) if terms else None
        if need_x and a_w is not None:
            d_x = backward(gy, x, a_w, None, *spec.args(), [True, False, False])[0]
        if need_w and a_x is not None:
            d_w = backward(gy, a_x, weight, None, *spec.args(), [False, True, False])[1]
        return d_gy, d_x, d_w


class _Conv(torch.autograd.Function):
    """A convolution by PyTorch's kernel, its backward a :class:`_ConvBackward`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, spec: _ConvSpec
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return torch.convolution(x, weight, bias, *spec.args())

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = (need_x, need_w, need_b and ctx.has_bias)
        gx, gw, gb = _ConvBackward.apply(gy, x, weight, mask, ctx.spec)
        return gx, gw, gb, None


def _expand(value: Any, dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)


def conv(
    func: Callable[..., Tensor],
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    """``func`` (:func:`~torch.nn.functional.conv1d`, ``conv2d`` or ``conv3d``) with the fused
    double backward; string padding (``"same"``, ``"valid"``) and unbatched inputs go to PyTorch's own."""
    dims = weight.dim() - 2
    if isinstance(padding, str) or input.dim() != dims + 2:
        return func(input, weight, bias, stride, padding, dilation, groups)
    spec = _ConvSpec(_expand(stride, dims), _expand(padding, dims), _expand(dilation, dims), groups)
    return _Conv.apply(input, weight, bias, spec)


_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)


class _SecondOrder(TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is F.batch_norm:
            return batch_norm(*args, **(kwargs or {}))
        if func in _CONVOLUTIONS:
            return conv(func, *args, **(kwargs or {}))
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
