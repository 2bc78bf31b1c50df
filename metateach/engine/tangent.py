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
  y' = g r (x' - m(x') - x^ m(x^ x')) + g' x^ + b', written as two
  multiply-adds over x and x' with per-channel coefficients, from two
  per-channel sums, x^ never formed (with running statistics,
  y' = g r x' + g' x^ + b'). The batch's mean and r are the ones the
  recorded pass's autograd node saved, taken when it was recorded; a pass
  recorded without a graph has them computed again.

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

from metateach.engine.channels import channel_dot, channel_sum, per_channel, scale_shift

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
    statistics: tuple[Tensor, Tensor] | None  # a training-mode batch norm's mean and 1/std


def _primal(t: Any) -> Any:
    return fwAD.unpack_dual(t).primal if isinstance(t, Tensor) else t


def _tangent(t: Tensor | None) -> Tensor | None:
    return None if t is None else fwAD.unpack_dual(t).tangent


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
    return _plus(found, t_b if func is F.linear else per_channel(t_b, recorded.input))


def _batch_statistics(output: Tensor) -> tuple[Tensor, Tensor] | None:
    """The batch mean and inverse standard deviation a training-mode batch norm's ``output``
    was normalized with, as its autograd node saved them (None if it has none)."""
    node = output.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0" or not node._saved_training:
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()


def _batch_norm_tangent(func: Callable[..., Tensor], call: _Call, now: _Parts) -> Tensor | None:
    """The fused tangent of batch norm (module docstring), per-channel coefficients first.

    x^ is never formed: with x^ = r x - r mean, a term c x^ is (c r) x - c r mean,
    and S(x' x^) = r (S(x' x) - mean S(x')) for the per-channel sums S.
    """
    x = call.parts.input.detach()
    running_mean, running_var, training, eps = (_primal(r) for r in now.rest)
    t_in, t_w, t_b = _tangent(now.input), _tangent(now.weight), _tangent(now.bias)
    batch_statistics = training or running_mean is None
    if not batch_statistics:
        mean, inv_std = running_mean, torch.rsqrt(running_var + eps)
    elif call.statistics is not None:
        mean, inv_std = call.statistics
    else:
        var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
        inv_std = torch.rsqrt(var + eps)
    gain = inv_std if now.weight is None else inv_std * _primal(now.weight)
    # y' = gain x' + c x^ + d, c and d per channel.
    c, d = t_w, t_b
    if t_in is not None and batch_statistics:
        count = x.numel() // x.shape[1]
        sum_in = channel_sum(t_in)
        d = _plus(d, -gain * sum_in / count)
        c = _plus(c, -gain * inv_std * (channel_dot(t_in, x) - mean * sum_in) / count)
    if c is not None:
        on_x = c * inv_std
        found = scale_shift(x, on_x, -on_x * mean if d is None else d - on_x * mean)
        return found if t_in is None else found.addcmul_(t_in, per_channel(gain, x))
    if t_in is not None:
        return scale_shift(t_in, gain, d)
    return None if d is None else per_channel(d, x)


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
            statistics = _batch_statistics(output) if func is F.batch_norm else None
            self.calls.append(_Call(func, parts, version, output, statistics))
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
