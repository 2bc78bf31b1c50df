"""A tangent pass that reuses a forward pass: forward mode without recomputing the primal.

Forward-mode AD computes every operator's output (the primal) beside its
tangent. When the same forward pass has just been taken (the training
forward of the step a hypergradient differentiates), the expensive outputs
are already there. :func:`recording` keeps, for one forward pass, the
inputs and outputs of its convolutions, linear maps and batch norms;
:meth:`ForwardRecord.replay` then re-runs the student's code in forward mode
with those operators replaced by their tangent rules on the recorded
inputs:

- a convolution or linear map y = W * x + b: y' = W * x' + W' * x + b',
  two products where forward mode takes three (the primal is the recorded y);
- batch norm in training mode, fused: with x^ the normalized input, r its
  inverse standard deviation and m(.) the mean over all axes but the channel,
  y' = g r (x' - m(x') - x^ m(x^ x')) + g' x^ + b', written as two fused
  multiply-adds with per-channel coefficients (with running statistics,
  y' = g r x' + g' x^ + b').

Every other operator (activations, additions, pooling, dropout with the
pass's random state) runs in PyTorch's own forward mode on the recorded
primals. The result is the tangent forward mode gives, to rounding
(``tests/test_tangent.py`` compares them on convolutional, residual,
BatchNorm, dropout and linear students, in training and evaluation mode).

The replay checks that it repeats the recorded pass: the same operators in
the same order on inputs of the same shapes, with the same weight tensors
unmodified since (their version counters). Anything else raises
:class:`ReplayMismatch`, and :func:`~metateach.engine.forward_mode.mixed_gradient`
falls back to the general forward-mode pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["ForwardRecord", "ReplayMismatch", "recording"]


class ReplayMismatch(RuntimeError):
    """The pass being replayed is not the recorded one (see the module docstring)."""


def _conv_args(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor | None, tuple[Any, ...]]:
    return input, weight, bias, (stride, padding, dilation, groups)


def _linear_args(
    input: Tensor, weight: Tensor, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None, tuple[Any, ...]]:
    return input, weight, bias, ()


def _batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor | None, Tensor | None, tuple[Any, ...]]:
    return input, weight, bias, (running_mean, running_var, training, eps)


class _Parts(NamedTuple):
    """An operator call's arguments: the input, the weight and bias, and the rest."""

    input: Tensor
    weight: Tensor | None
    bias: Tensor | None
    rest: tuple[Any, ...]


class _Call(NamedTuple):
    """A recorded operator call: the operator, its arguments, its weight's version, its output."""

    func: Callable[..., Tensor]
    parts: _Parts
    weight_version: int | None
    output: Tensor


def _primal(t: Any) -> Any:
    return fwAD.unpack_dual(t).primal if isinstance(t, Tensor) else t


def _tangent(t: Tensor | None) -> Tensor | None:
    return None if t is None else fwAD.unpack_dual(t).tangent


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _plus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _affine_tangent(func: Callable[..., Tensor], call: _Call, now: _Parts) -> Tensor | None:
    """y' = W x' + W' x + b' of a convolution or linear map y = W x + b (``func``)."""
    recorded = call.parts
    t_in, t_w, t_b = _tangent(now.input), _tangent(now.weight), _tangent(now.bias)
    weight = _primal(now.weight)
    found = None if t_in is None else func(t_in, weight, None, *now.rest)
    if t_w is not None:
        return _plus(found, func(recorded.input.detach(), t_w, t_b, *now.rest))
    if t_b is None:
        return found
    shape = [-1] if func is F.linear else _channel_shape(recorded.input)
    return _plus(found, t_b.view(shape))


def _batch_statistics(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The batch mean and inverse standard deviation a training-mode batch norm's ``output``
    was normalized with, as its autograd node saved them (None if it did not, or they are
    freed)."""
    node = output.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0" or not node._saved_training:
        return None
    try:
        return node._saved_result1, node._saved_result2
    except RuntimeError:  # the graph's saved tensors are freed
        return None


def _batch_norm_tangent(func: Callable[..., Tensor], call: _Call, now: _Parts) -> Tensor | None:
    """The fused tangent of batch norm (module docstring), per-channel coefficients first."""
    x = call.parts.input.detach()
    running_mean, running_var, training, eps = (_primal(r) for r in now.rest)
    t_in, t_w, t_b = _tangent(now.input), _tangent(now.weight), _tangent(now.bias)
    shape = _channel_shape(x)
    batch_statistics = training or running_mean is None
    if batch_statistics:
        saved = _batch_statistics(call.output)
        if saved is None:
            normalized, _, inv_std = torch.native_batch_norm(
                x, None, None, None, None, True, 0, eps
            )
        else:
            mean, inv_std = (s.detach() for s in saved)
            normalized = (x - mean.view(shape)) * inv_std.view(shape)
    else:
        inv_std = torch.rsqrt(running_var + eps)
        normalized = (x - running_mean.view(shape)) * inv_std.view(shape)
    gain = inv_std if now.weight is None else inv_std * _primal(now.weight)
    # y' = gain x' + c x^ + d, c and d per channel.
    c, d = t_w, t_b
    if t_in is not None and batch_statistics:
        axes = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        d = _plus(d, -gain * t_in.sum(axes) / count)
        c = _plus(c, -gain * (normalized * t_in).sum(axes) / count)
    found = None
    if c is not None:
        found = normalized * c.view(shape)
    if d is not None:
        found = d.view(shape) if found is None else found + d.view(shape)
    if t_in is not None:
        scaled = gain.view(shape)
        found = t_in * scaled if found is None else torch.addcmul(found, t_in, scaled)
    return found


_Rule = tuple[Callable[..., tuple[Any, ...]], Callable[..., Tensor | None]]

#: operator -> (its arguments' parts, its tangent rule)
_RULES: dict[Callable[..., Tensor], _Rule] = {
    torch.conv1d: (_conv_args, _affine_tangent),
    torch.conv2d: (_conv_args, _affine_tangent),
    torch.conv3d: (_conv_args, _affine_tangent),
    F.linear: (_linear_args, _affine_tangent),
    F.batch_norm: (_batch_norm_args, _batch_norm_tangent),
}


class ForwardRecord(TorchFunctionMode):
    """The convolutions, linear maps and batch norms of one forward pass, with their outputs.

    Made by :func:`recording`; replayed once by :meth:`replay`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        rule = _RULES.get(func)
        if rule is not None:
            parts = _Parts(*rule[0](*args, **kwargs))
            version = None if parts.weight is None else parts.weight._version
            self.calls.append(_Call(func, parts, version, output))
        return output

    def replay(self) -> contextlib.AbstractContextManager[None]:
        """A block in which the recorded operators return their recorded outputs, carrying
        their tangents (inside a ``forward_ad.dual_level``); raises :class:`ReplayMismatch`
        if the block's pass is not the recorded one."""
        return _Replay(self.calls)


class _Replay(TorchFunctionMode):
    def __init__(self, calls: list[_Call]) -> None:
        super().__init__()
        self.calls = calls
        self.position = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        rule = _RULES.get(func)
        if rule is None:
            return func(*args, **kwargs)
        now = _Parts(*rule[0](*args, **kwargs))
        recorded = self._next(func, now)
        output = recorded.output.detach()
        tangent = rule[1](func, recorded, now)
        if tangent is None:  # nothing here moves
            return output
        if tangent.shape != output.shape:  # a bias's tangent alone
            tangent = tangent.expand_as(output)
        return fwAD.make_dual(output, tangent)

    def _next(self, func: Callable[..., Tensor], now: _Parts) -> _Call:
        if self.position == len(self.calls):
            raise ReplayMismatch(f"{func.__name__} was not in the recorded pass")
        call = self.calls[self.position]
        self.position += 1
        if call.func is not func:
            raise ReplayMismatch(
                f"{func.__name__} where the recorded pass had {call.func.__name__}"
            )
        if call.parts.input.shape != _primal(now.input).shape:
            raise ReplayMismatch(
                f"{func.__name__}'s input is {tuple(_primal(now.input).shape)}, "
                f"recorded {tuple(call.parts.input.shape)}"
            )
        if call.parts.weight is not None:
            weight = _primal(now.weight)
            if (
                weight is None
                or weight.data_ptr() != call.parts.weight.data_ptr()
                or weight._version != call.weight_version
            ):
                raise ReplayMismatch(f"{func.__name__}'s weight is not the recorded one")
        return call

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if exc[0] is None and self.position != len(self.calls):
            raise ReplayMismatch(
                f"the pass made {self.position} of the recorded {len(self.calls)} calls"
            )


@contextlib.contextmanager
def recording(enabled: bool = True) -> Iterator[ForwardRecord | None]:
    """A block whose forward pass is recorded for a tangent pass (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    record = ForwardRecord()
    with record:
        yield record
