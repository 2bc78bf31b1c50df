"""Schedules are the papers'; the optimizers are tests/test_rules.py's."""

from __future__ import annotations

import pytest

from metateach.optim import build_schedule


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
