"""The functional inner loop against PyTorch's and TorchOpt's SGD."""

from __future__ import annotations

import pytest
import torch
import torchopt

from metateach.optim.rules import (
    decayed_gradients,
    momentum_sgd_step,
    recover_momentum,
    reverse_momentum_sgd,
)

MU, WD = 0.9, 5e-4
LRS = [0.1, 0.1, 0.05, 0.3, 0.01]


def fake_grads(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.sin(3.1 * v) + 0.01 * v.square() for k, v in params.items()}


def start(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(300, 17, generator=g, dtype=dtype),
        "b": torch.randn(41, generator=g, dtype=dtype),
    }


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_sgd_step_is_torch_sgd_bit_for_bit(nesterov: bool) -> None:
    reference = {k: v.clone().requires_grad_() for k, v in start().items()}
    optimizer = torch.optim.SGD(
        reference.values(), lr=LRS[0], momentum=MU, weight_decay=WD, nesterov=nesterov
    )
    params, momentum = start(), {"w": None, "b": None}
    for lr in LRS:
        for group in optimizer.param_groups:
            group["lr"] = lr
        grads = fake_grads({k: v.detach() for k, v in reference.items()})
        for k, p in reference.items():
            p.grad = grads[k]
        optimizer.step()
        params, momentum = momentum_sgd_step(
            params, momentum, fake_grads(params), lr, MU, WD, nesterov
        )
    for k, p in reference.items():
        assert torch.equal(p.detach(), params[k])
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum[k])


def test_momentum_sgd_step_agrees_with_torchopt() -> None:
    params, momentum = start(torch.float64), {"w": None, "b": None}
    transform = torchopt.sgd(lr=1.0, momentum=MU, weight_decay=WD)  # lr applied below, per step
    other = start(torch.float64)
    state = transform.init(other)
    for lr in LRS:
        params, momentum = momentum_sgd_step(params, momentum, fake_grads(params), lr, MU, WD)
        updates, state = transform.update(fake_grads(other), state, params=other, inplace=False)
        other = {k: other[k] + lr * updates[k] for k in other}
    for k in params:
        assert torch.allclose(params[k], other[k], rtol=1e-12, atol=1e-12)


def test_a_step_runs_backwards_to_where_it_started() -> None:
    params, momentum = start(torch.float64), {"w": None, "b": None}
    for lr in LRS[:2]:
        params, momentum = momentum_sgd_step(params, momentum, fake_grads(params), lr, MU, WD)
    before, v_before = params, momentum
    after, v_after = momentum_sgd_step(before, v_before, fake_grads(before), 0.05, MU, WD)
    recovered = reverse_momentum_sgd(after, v_after, 0.05)
    decayed = decayed_gradients(fake_grads(recovered), recovered, WD)
    v_recovered = recover_momentum(v_after, decayed, MU)
    for k in before:
        assert torch.allclose(recovered[k], before[k], rtol=0, atol=1e-14)
        assert torch.allclose(v_recovered[k], v_before[k], rtol=0, atol=1e-12)


def test_the_step_is_differentiable_in_its_inputs() -> None:
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([0.5, 0.5], dtype=torch.float64)
    g = w.square()  # a gradient that depends on w
    new, _ = momentum_sgd_step({"w": w}, {"w": v}, {"w": g}, 0.1, MU, WD)
    (dw,) = torch.autograd.grad(new["w"].sum(), w)
    # d/dw [w - 0.1 (0.9 v + w^2 + wd w)] = 1 - 0.1 (2w + wd)
    assert torch.allclose(dw, 1 - 0.1 * (2 * w.detach() + WD))
