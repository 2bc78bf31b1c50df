"""Optimizers follow PyTorch's conventions; schedules are the papers'."""

from __future__ import annotations

import pytest
import torch

from metateach.optim import build_optimizer, build_schedule


def test_step_decay_divides_by_ten_at_the_milestones() -> None:
    schedule = build_schedule("step", 300, milestones=[80, 120], gamma=0.1)
    assert schedule(0) == 1.0 and schedule(79.99) == 1.0
    assert schedule(80) == pytest.approx(0.1) and schedule(119.5) == pytest.approx(0.1)
    assert schedule(120) == pytest.approx(0.01) and schedule(299) == pytest.approx(0.01)


def test_cosine_goes_from_one_to_its_floor() -> None:
    schedule = build_schedule("cosine", 10, min_factor=0.1)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(5) == pytest.approx(0.55)
    assert schedule(10) == pytest.approx(0.1)


def test_warmup_ramps_linearly_then_hands_over() -> None:
    schedule = build_schedule("constant", 10, warmup_epochs=2)
    assert (
        schedule(0) == 0.0
        and schedule(1) == pytest.approx(0.5)
        and schedule(2) == 1.0
        and schedule(7) == 1.0
    )


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        (
            "sgd",
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
        ),
        (
            "adam",
            lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=5e-4),
        ),
    ],
)
def test_optimizers_match_torch_with_the_same_settings(name: str, reference: object) -> None:
    torch.manual_seed(0)
    ours_w = torch.randn(5, requires_grad=True)
    ref_w = ours_w.detach().clone().requires_grad_()
    lr = 0.1 if name == "sgd" else 0.01
    ours = build_optimizer(
        name,
        [ours_w],
        lr=lr,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=True,
        betas=[0.8, 0.99],
        eps=1e-6,
    )
    ref = reference([ref_w])
    for _ in range(5):
        for w, opt in ((ours_w, ours), (ref_w, ref)):
            opt.zero_grad()
            (w.square().sum() + w.sum()).backward()
            opt.step()
    assert torch.equal(ours_w, ref_w)
