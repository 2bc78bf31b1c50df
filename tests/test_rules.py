"""The student's update rules against the ``torch.optim`` classes they stand for.

100 float64 steps of every registered optimizer (through
:class:`~metateach.optim.RuleOptimizer`, the learning rate changing every
step) equal the ``torch.optim`` class's to 1e-10 relative; momentum SGD
equals ``torch.optim.SGD`` bit for bit. The state is kept in
``torch.optim``'s layout: it moves between the two in both directions
mid-run, and through a ``weights_only`` checkpoint.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from metateach.optim import build_optimizer, set_lr
from metateach.registry import OPTIMIZERS

Reference = Callable[[list[Tensor], float], torch.optim.Optimizer]

#: case -> (optim.name, its settings, the torch.optim optimizer with the same settings).
CASES: dict[str, tuple[str, dict[str, Any], Reference]] = {
    "sgd": (
        "sgd",
        {"momentum": 0.9, "weight_decay": 5e-3},
        lambda p, lr: torch.optim.SGD(p, lr, momentum=0.9, weight_decay=5e-3),
    ),
    "sgd_nesterov": (
        "sgd",
        {"momentum": 0.8, "weight_decay": 5e-3, "nesterov": True},
        lambda p, lr: torch.optim.SGD(p, lr, momentum=0.8, weight_decay=5e-3, nesterov=True),
    ),
    "sgd_plain": ("sgd", {"momentum": 0.0}, lambda p, lr: torch.optim.SGD(p, lr)),
    "adam": (
        "adam",
        {"weight_decay": 1e-2, "betas": [0.8, 0.99], "eps": 1e-6},
        lambda p, lr: torch.optim.Adam(p, lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    ),
    "adamw": (
        "adamw",
        {"weight_decay": 1e-1},
        lambda p, lr: torch.optim.AdamW(p, lr, weight_decay=1e-1),
    ),
    "rmsprop": (
        "rmsprop",
        {"momentum": 0.0, "weight_decay": 1e-2},
        lambda p, lr: torch.optim.RMSprop(p, lr, weight_decay=1e-2),
    ),
    "rmsprop_centered_momentum": (
        "rmsprop",
        {"momentum": 0.9, "weight_decay": 1e-2, "kwargs": {"alpha": 0.9, "centered": True}},
        lambda p, lr: torch.optim.RMSprop(
            p, lr, alpha=0.9, weight_decay=1e-2, momentum=0.9, centered=True
        ),
    ),
    "adagrad": (
        "adagrad",
        {
            "weight_decay": 1e-2,
            "eps": 1e-10,
            "kwargs": {"lr_decay": 0.01, "initial_accumulator_value": 0.1},
        },
        lambda p, lr: torch.optim.Adagrad(
            p, lr, lr_decay=0.01, weight_decay=1e-2, initial_accumulator_value=0.1, eps=1e-10
        ),
    ),
    "adadelta": (
        "adadelta",
        {"weight_decay": 1e-2, "eps": 1e-6, "kwargs": {"rho": 0.8}},
        lambda p, lr: torch.optim.Adadelta(p, lr, rho=0.8, eps=1e-6, weight_decay=1e-2),
    ),
}

BASE_LR = {"sgd": 0.05, "adadelta": 1.0}


def rate(name: str, t: int) -> float:
    """A learning rate that changes every step."""
    return BASE_LR.get(name, 0.01) * (1 + 0.5 * math.sin(t))


def start() -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(),
    ]


def put_gradients(params: list[Tensor], t: int) -> None:
    """A gradient that depends on the parameters; the second tensor's is zero for 3 steps."""
    for i, p in enumerate(params):
        p.grad = torch.sin(3 * p.detach()) + 0.1 * p.detach()
        if i == 1 and t < 3:
            p.grad = torch.zeros_like(p)


def run(
    name: str, optimizer: torch.optim.Optimizer, params: list[Tensor], steps: range
) -> list[Tensor]:
    for t in steps:
        set_lr(optimizer, rate(name, t))
        put_gradients(params, t)
        optimizer.step()
    return params


def relative_error(a: list[Tensor], b: list[Tensor]) -> float:
    error = torch.sqrt(
        sum((x.detach() - y.detach()).square().sum() for x, y in zip(a, b, strict=True))
    )
    return float(error / torch.sqrt(sum(y.detach().square().sum() for y in b)))


def ours(case: str, params: list[Tensor]) -> torch.optim.Optimizer:
    name, settings, _ = CASES[case]
    return build_optimizer(name, params, lr=rate(name, 0), **settings)


def reference(case: str, params: list[Tensor]) -> torch.optim.Optimizer:
    name, _, make = CASES[case]
    return make(params, rate(name, 0))


def test_every_registered_optimizer_is_compared() -> None:
    assert {name for name, _, _ in CASES.values()} == set(OPTIMIZERS)


@pytest.mark.parametrize("case", list(CASES))
def test_100_steps_equal_torch_optim(case: str) -> None:
    name = CASES[case][0]
    a, b = start(), start()
    run(name, ours(case, a), a, range(100))
    run(name, reference(case, b), b, range(100))
    if name == "sgd":
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert relative_error(a, b) < 1e-10
    assert relative_error(b, start()) > 1e-2  # the steps moved the parameters


@pytest.mark.parametrize("case", list(CASES))
def test_state_moves_between_ours_and_torch_optim_mid_run(case: str) -> None:
    """50 steps of one, its state loaded into the other, 50 more: as 100 of either.

    (The state: the parameter groups hold each one's own settings.)"""
    name = CASES[case][0]
    whole = start()
    run(name, reference(case, whole), whole, range(100))
    for first, second in ((ours, reference), (reference, ours)):
        params = start()
        before = first(case, params)
        run(name, before, params, range(50))
        after = second(case, params)
        after.load_state_dict({**after.state_dict(), "state": before.state_dict()["state"]})
        run(name, after, params, range(50, 100))
        assert relative_error(params, whole) < 1e-10, (first.__name__, second.__name__)


@pytest.mark.parametrize("case", ["adam", "rmsprop_centered_momentum", "sgd"])
def test_state_survives_a_weights_only_checkpoint(case: str) -> None:
    name = CASES[case][0]
    a, b = start(), start()
    one = ours(case, a)
    run(name, one, a, range(10))
    buffer = io.BytesIO()
    torch.save(one.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        for x, y in zip(b, a, strict=True):
            x.copy_(y)
    two = ours(case, b)
    two.load_state_dict(torch.load(buffer, weights_only=True))
    run(name, one, a, range(10, 20))
    run(name, two, b, range(10, 20))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_state_of_another_optimizer_is_refused_by_name() -> None:
    params = start()
    adam = ours("adam", params)
    run("adam", adam, params, range(2))
    rmsprop = ours("rmsprop_centered_momentum", params)
    rmsprop.load_state_dict(adam.state_dict())
    put_gradients(params, 3)
    with pytest.raises(ValueError, match=r"optim.name=rmsprop keeps .*grad_avg.*another optimizer"):
        rmsprop.step()


def test_the_update_is_pure_and_differentiable() -> None:
    """The rule changes none of its inputs, and its step has the derivative central
    differences give, in the gradient and in the state (Adam, from an empty state)."""
    optimizer = ours("adam", start())
    rule = optimizer.rule
    params = [p.detach() for p in start()]
    grads = [torch.sin(p) for p in params]
    state = rule.from_slots([{}, {}], params)
    copies = [p.clone() for p in params], [g.clone() for g in grads]
    leaves = [g.clone().requires_grad_() for g in grads]
    new, state = rule.update(params, state, leaves, 0.01)
    new, _ = rule.update(new, state, [torch.cos(p) for p in params], 0.01)
    assert all(torch.equal(p, c) for p, c in zip(params, copies[0], strict=True))
    assert all(torch.equal(g, c) for g, c in zip(grads, copies[1], strict=True))
    (found,) = torch.autograd.grad(new[0].sum(), leaves[0])
    h, j = 1e-6, 3
    values = []
    for sign in (1, -1):
        moved = [g.clone() for g in grads]
        moved[0].view(-1)[j] += sign * h
        once, s = rule.update(params, rule.from_slots([{}, {}], params), moved, 0.01)
        twice, _ = rule.update(once, s, [torch.cos(p) for p in params], 0.01)
        values.append(float(twice[0].sum()))
    assert float(found.view(-1)[j]) == pytest.approx((values[0] - values[1]) / (2 * h), rel=1e-6)


@pytest.mark.parametrize("case", ["adam", "rmsprop_centered_momentum", "adagrad"])
def test_a_parameter_that_joins_later_starts_its_own_state(case: str) -> None:
    """A tensor without a gradient for 3 steps is left alone, then starts from the initial
    state while the others carry theirs, as in ``torch.optim`` (per-parameter step counts)."""
    name = CASES[case][0]
    found = []
    for make in (ours, reference):
        params = start()
        optimizer = make(case, params)
        for t in range(20):
            set_lr(optimizer, rate(name, t))
            put_gradients(params, t)
            if t < 3:
                params[1].grad = None
            optimizer.step()
        found.append(params)
    assert relative_error(*found) < 1e-10
    assert relative_error(found[1], start()) > 1e-2
