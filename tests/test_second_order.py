"""The fused double backwards of batch norm and convolutions (metateach.engine.second_order)
against PyTorch's, in float64.

The hypergradients that use it (``unrolled``, ``reversible``, ``implicit``)
are checked against central differences on a BatchNorm ResNet in
``tests/test_check.py``; here the rule itself is compared with PyTorch's
rule and with numerical differences, and the routes are compared with the
same routes on PyTorch's rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.engine import strategy
from metateach.engine.problem import BilevelProblem
from metateach.engine.second_order import (
    _BatchNormDoubleBackward,
    _ConvDoubleBackward,
    batch_norm,
    conv,
    second_order,
)
from metateach.engine.strategy import HypergradMethod
from metateach.hypergrad import reversible, unrolled
from metateach.hypergrad.implicit import Implicit
from metateach.hypergrad.reversible import Reversible
from metateach.hypergrad.unrolled import Unrolled
from metateach.models import create_model

from .hypergrad_fixtures import Setup

#: Inputs of BatchNorm1d (two shapes), BatchNorm2d and BatchNorm3d (small: gradgradcheck
#: builds the full Jacobian).
SHAPES = [(6, 4), (3, 2, 7), (3, 2, 3, 3), (2, 2, 2, 3, 2)]


def _inputs(shape: tuple[int, ...], affine: bool, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    c = shape[1]

    def leaf(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64).requires_grad_()

    return (leaf(*shape), leaf(c), leaf(c)) if affine else (leaf(*shape),)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_rule_passes_gradcheck_and_gradgradcheck(shape: tuple[int, ...], affine: bool) -> None:
    def bn(x: Tensor, w: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        return batch_norm(x, None, None, w, b, training=True)

    inputs = _inputs(shape, affine)
    assert bn(*inputs).grad_fn is not None
    assert type(bn(*inputs).grad_fn).__name__ == "_BatchNormBackward"
    assert torch.autograd.gradcheck(bn, inputs)
    assert torch.autograd.gradgradcheck(bn, inputs)


@pytest.mark.parametrize("running", [True, False], ids=["running statistics", "none"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "not affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_statistics_and_both_derivatives_equal_pytorchs(
    shape: tuple[int, ...], affine: bool, running: bool
) -> None:
    inputs = _inputs(shape, affine)
    x, (w, b) = inputs[0], (inputs[1:] if affine else (None, None))
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    adjoint = torch.randn(shape, generator=g, dtype=torch.float64)
    on_channels = torch.randn(shape[1], generator=g, dtype=torch.float64)
    start = (torch.rand(shape[1], generator=g), torch.rand(shape[1], generator=g) + 1)
    found = []
    for fn in (F.batch_norm, batch_norm):
        stats = tuple(s.double() for s in start)  # copies, updated in place
        mean, var = stats if running else (None, None)
        y = fn(x, mean, var, w, b, True, 0.3, 1e-3)
        firsts = torch.autograd.grad(y, inputs, upstream, create_graph=True)
        # <A, gx> + <c, gw> + <c^2, gb>: every adjoint of the double backward non-zero
        product = (firsts[0] * adjoint).sum()
        if affine:
            product = product + (firsts[1] * on_channels).sum() + (firsts[2] * on_channels**2).sum()
        seconds = torch.autograd.grad(product, [*inputs, upstream], allow_unused=True)
        found.append([y, *stats, *firsts, *(s for s in seconds if s is not None)])
    theirs, ours = found
    assert len(ours) == len(theirs) == 3 + 2 * len(inputs) + 1 - (1 if affine else 0)
    for a, b_ in zip(theirs, ours, strict=True):
        torch.testing.assert_close(b_, a, rtol=1e-12, atol=1e-12)


#: Convolutions: (function, input shape, weight shape, keyword arguments).
CONVOLUTIONS = {
    "conv1d": (F.conv1d, (2, 2, 7), (3, 2, 3), {"padding": 1}),
    "conv2d strided, dilated": (
        F.conv2d,
        (2, 2, 6, 5),
        (3, 2, 2, 3),
        {"stride": 2, "dilation": (2, 1)},
    ),
    "conv2d grouped": (F.conv2d, (2, 4, 5, 5), (4, 2, 3, 3), {"groups": 2, "padding": (1, 0)}),
    "conv3d": (F.conv3d, (1, 2, 3, 4, 3), (2, 2, 2, 2, 2), {}),
}


def _conv_inputs(name: str, biased: bool) -> tuple[Tensor, ...]:
    _, x_shape, w_shape, _ = CONVOLUTIONS[name]
    g = torch.Generator().manual_seed(2)

    def leaf(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, dtype=torch.float64).requires_grad_()

    x, w = leaf(*x_shape), leaf(*w_shape)
    return (x, w, leaf(w_shape[0])) if biased else (x, w)


@pytest.mark.parametrize("biased", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("name", CONVOLUTIONS)
def test_the_convolutions_pass_gradgradcheck_and_equal_pytorchs_rule(
    name: str, biased: bool
) -> None:
    func, _, _, kwargs = CONVOLUTIONS[name]
    inputs = _conv_inputs(name, biased)

    def ours(*t: Tensor) -> Tensor:
        return conv(func, *t, **kwargs)

    assert type(ours(*inputs).grad_fn).__name__ == "_ConvBackward"
    assert torch.autograd.gradgradcheck(ours, inputs)
    g = torch.Generator().manual_seed(3)
    found = []
    for fn in (lambda *t: func(*t, **kwargs), ours):
        y = fn(*inputs)
        upstream = torch.randn(y.shape, generator=g, dtype=torch.float64, requires_grad=True)
        adjoints = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in inputs]
        firsts = torch.autograd.grad(y, inputs, upstream, create_graph=True)
        product = sum((f * a).sum() for f, a in zip(firsts, adjoints, strict=True))
        seconds = torch.autograd.grad(product, [*inputs, upstream], allow_unused=True)
        found.append([y, *firsts, *(torch.zeros(()) if d is None else d for d in seconds)])
        g.manual_seed(3)  # the same upstream and adjoints for both
    for theirs, ours_ in zip(*found, strict=True):
        torch.testing.assert_close(ours_, theirs, rtol=1e-12, atol=1e-12)


def test_a_convolution_without_some_adjoints_skips_their_terms() -> None:
    # Only the input's gradient is differentiated: d/dW takes no term, d/dx none either.
    x, w = _conv_inputs("conv1d", biased=False)
    y = conv(F.conv1d, x, w, padding=1)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (ours,) = torch.autograd.grad(gx.square().sum(), w)
    y = F.conv1d(x, w, padding=1)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (theirs,) = torch.autograd.grad(gx.square().sum(), w)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_third_derivative_raises_instead_of_dropping_the_term() -> None:
    # once_differentiable's error node is pruned by autograd.grad with named inputs: the
    # third derivative came out finite and wrong. Ours raises.
    bn = nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    with second_order():
        y = bn(x)
    (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative"):
        torch.autograd.grad(gg.sum(), x)
    conv2d = nn.Conv2d(3, 2, 3).double()
    with second_order():
        y = conv2d(x)
    (g,) = torch.autograd.grad((y**3).sum(), conv2d.weight, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative"):
        torch.autograd.grad(gg.sum(), x)


def test_the_mode_takes_training_batch_norms_and_convolutions() -> None:
    bn = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with second_order():
        trained = bn(x)
        bn.eval()
        evaluated = bn(x)
    with second_order(enabled=False):
        bn.train()
        plain = bn(x)
    assert type(trained.grad_fn).__name__ == "_BatchNormBackward"
    assert type(evaluated.grad_fn).__name__ == "NativeBatchNormBackward0"
    assert type(plain.grad_fn).__name__ == "NativeBatchNormBackward0"
    with second_order():
        taken = nn.Conv2d(3, 2, 3)(x)
        same = nn.Conv2d(3, 2, 3, padding="same")(x)
    assert type(taken.grad_fn).__name__ == "_ConvBackward"
    assert type(same.grad_fn).__name__ == "ConvolutionBackward0"
    # A batch of one value a channel is PyTorch's error, raised by PyTorch.
    with second_order(), pytest.raises(ValueError, match="Expected more than 1 value"):
        bn.train()(torch.randn(1, 3, 1, 1))


def test_a_resnets_hessian_vector_product_equals_pytorchs() -> None:
    torch.manual_seed(0)
    model = create_model("resnet8", 10, (3, 16, 16)).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]
    found = []
    for mode in (contextlib.nullcontext(), second_order()):
        with mode:
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        product = sum((g * v).sum() for g, v in zip(grads, vector, strict=True))
        found.append(torch.autograd.grad(product, params))
    for a, b in zip(*found, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert max(float(a.abs().max()) for a in found[0]) > 1e-3


def _on_pytorchs_rule(enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


@pytest.mark.parametrize(
    ("make", "steps"),
    [
        (lambda p: Unrolled(p, 3, 2), 3),
        (lambda p: Reversible(p, 3, 2), 3),
        (lambda p: Implicit(p, solver="cg", iterations=2), 1),
    ],
    ids=["unrolled", "reversible", "implicit"],
)
def test_every_route_gives_the_hypergradient_it_gives_on_pytorchs_rule(
    make: Callable[[BilevelProblem], HypergradMethod], steps: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # implicit's Hessian-vector products run through the student's double backward too;
    # tests/test_check.py checks it against differences on a linear problem only.
    setup = Setup("resnet8")
    taken: list[str] = []
    for rule in (_BatchNormDoubleBackward, _ConvDoubleBackward):
        fused = rule.forward
        spy = staticmethod(
            lambda *a, rule=rule, fused=fused: taken.append(rule.__name__) or fused(*a)
        )
        monkeypatch.setattr(rule, "forward", spy)
    ours = setup.hypergradient(make, steps)
    assert set(taken) == {"_BatchNormDoubleBackward", "_ConvDoubleBackward"}  # the fused rules
    for module in (unrolled, reversible, strategy):
        monkeypatch.setattr(module, "second_order", _on_pytorchs_rule)
    theirs = setup.hypergradient(make, steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    assert float(theirs.abs().max()) > 1e-6
