"""Lessons: weight normalization and the one student loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metateach.lesson import Lesson, lesson_loss, normalize_weights


def test_normalized_weights_sum_to_the_batch_size() -> None:
    raw = torch.tensor([0.5, 1.0, 2.5, 0.0])
    w = normalize_weights(raw)
    assert w.sum().item() == pytest.approx(4.0)
    assert torch.allclose(w / w[1], raw / raw[1])  # proportions kept


def test_normalized_weights_with_a_mask_sum_to_the_selected_count() -> None:
    raw = torch.tensor([1.0, 3.0, 2.0, 2.0])
    mask = torch.tensor([True, False, True, True])
    w = normalize_weights(raw, mask)
    assert w[1] == 0 and w.sum().item() == pytest.approx(3.0)


def test_all_zero_weights_stay_zero() -> None:
    assert torch.equal(normalize_weights(torch.zeros(3)), torch.zeros(3))


def test_no_lesson_is_mean_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert torch.allclose(lesson_loss(None, logits, y), F.cross_entropy(logits, y))


def test_all_one_weights_give_the_plain_loss_and_gradient_bit_for_bit() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 5, requires_grad=True)
    y = torch.randint(0, 5, (7,))
    plain = lesson_loss(None, logits, y)
    (g_plain,) = torch.autograd.grad(plain, logits)
    ones = lesson_loss(Lesson.weighted(torch.ones(7)), logits, y)
    (g_ones,) = torch.autograd.grad(ones, logits)
    assert torch.equal(plain, ones) and torch.equal(g_plain, g_ones)


def test_weights_mask_and_loss_function_combine() -> None:
    torch.manual_seed(1)
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    ce = F.cross_entropy(logits, y, reduction="none")
    weights = torch.tensor([2.0, 0.0, 1.0, 1.0])
    assert torch.allclose(lesson_loss(Lesson(weights=weights), logits, y), (weights * ce).sum() / 4)
    mask = torch.tensor([True, True, False, False])
    assert torch.allclose(lesson_loss(Lesson(mask=mask), logits, y), ce[:2].mean())
    both = Lesson.weighted(torch.tensor([1.0, 3.0, 5.0, 5.0]), mask)
    assert torch.allclose(lesson_loss(both, logits, y), (0.5 * ce[0] + 1.5 * ce[1]) / 2)

    def margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits.logsumexp(1) - logits.gather(1, targets[:, None]).squeeze(1) + 1.0

    assert torch.allclose(lesson_loss(Lesson(loss_fn=margin), logits, y), (ce + 1).mean())


def test_a_dropped_sample_cannot_poison_the_loss() -> None:
    logits = torch.tensor([[0.0, 0.0], [float("inf"), -float("inf")]])
    y = torch.tensor([0, 1])
    loss = lesson_loss(Lesson(mask=torch.tensor([True, False])), logits, y)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(
        torch.log(torch.tensor(2.0)).item()
    )


def test_malformed_lessons_are_refused() -> None:
    with pytest.raises(TypeError, match="mask must be boolean"):
        Lesson(mask=torch.ones(3))
    with pytest.raises(
        ValueError, match=r"weights must be one value per sample, got shape \(3, 1\)"
    ):
        Lesson(weights=torch.ones(3, 1))
