"""The data-weighting teachers: what each one gives a batch, and that each runs in the trainer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metateach.data import Batch
from metateach.errors import ConfigError
from metateach.hypergrad import ExampleGradients, StudentOnly
from metateach.hypergrad.unrolled import Unrolled
from metateach.lesson import lesson_loss
from metateach.models import create_model
from metateach.teacher import StudentView, TeachingContext
from metateach.teachers import (
    DeepInteractionTeacher,
    FocalLoss,
    LearningToReweight,
    MetaWeightNet,
    RandomFilter,
    SelfPacedLearning,
)
from metateach.teachers.focal import focal_loss
from metateach.trainer import Trainer


def view_of(logits: torch.Tensor, y: torch.Tensor, progress: float = 0.0, **extra) -> StudentView:
    n = len(y)
    context = TeachingContext(int(progress * 100), 0, 100, torch.tensor(0.7), 0.8)
    losses = F.cross_entropy(logits, y, reduction="none")
    return StudentView(
        logits,
        losses,
        torch.randn(n, 4),
        (torch.randn(n, 3, 2, 2), torch.randn(n, 4)),
        context,
        **extra,
    )


def batch_of(n: int, classes: int = 3, seed: int = 0) -> tuple[Batch, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return Batch(torch.zeros(n, 1), y, torch.arange(n)), torch.randn(n, classes, generator=g)


def test_focal_loss_is_cross_entropy_scaled_by_confidence() -> None:
    batch, logits = batch_of(16)
    ce = F.cross_entropy(logits, batch.y, reduction="none")
    assert torch.allclose(focal_loss(logits, batch.y, 0.0), ce)
    p = torch.exp(-ce)
    assert torch.allclose(focal_loss(logits, batch.y, 2.0), (1 - p) ** 2 * ce)
    lesson = FocalLoss(gamma=0.5)(batch, view_of(logits, batch.y))
    assert torch.allclose(lesson_loss(lesson, logits, batch.y), ((1 - p) ** 0.5 * ce).mean())
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        FocalLoss(gamma=-1)


def test_self_paced_learning_admits_harder_samples_as_training_goes_on() -> None:
    spl = SelfPacedLearning(start=0.25, full_at=0.5)
    assert (
        spl.pace(0.0) == 0.25
        and spl.pace(0.25) == pytest.approx(0.625)
        and spl.pace(0.5) == 1.0 == spl.pace(0.9)
    )
    batch, logits = batch_of(40, seed=1)
    early = spl(batch, view_of(logits, batch.y, progress=0.0)).mask
    later = spl(batch, view_of(logits, batch.y, progress=0.3)).mask
    late = spl(batch, view_of(logits, batch.y, progress=0.6)).mask
    losses = F.cross_entropy(logits, batch.y, reduction="none")
    assert early.sum() == 10 and losses[early].max() < losses[~early].min()  # the easiest quarter
    assert bool((later | ~early).all()) and later.sum() > early.sum()  # the set only grows
    assert late.all()


def test_random_filter_keeps_the_share_asked_for_reproducibly() -> None:
    teacher = RandomFilter(keep=0.3, seed=4)
    batch, logits = batch_of(2000)
    first = teacher(batch, view_of(logits, batch.y, progress=0.01)).mask
    again = teacher(batch, view_of(logits, batch.y, progress=0.01)).mask
    other = teacher(batch, view_of(logits, batch.y, progress=0.02)).mask
    assert first.float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_learning_to_reweight_clips_and_normalizes_the_example_gradients() -> None:
    batch, logits = batch_of(4)
    grad = torch.tensor([-2.0, 1.0, -1.0, 0.5])
    lesson = LearningToReweight()(batch, view_of(logits, batch.y, example_grad=grad))
    assert torch.allclose(lesson.weights, torch.tensor([2.0, 0.0, 1.0, 0.0]) * 4 / 3)
    with pytest.raises(RuntimeError, match="needs the engine's example gradients"):
        LearningToReweight()(batch, view_of(logits, batch.y))


def test_meta_weight_net_weights_are_a_function_of_the_loss_summing_to_the_batch() -> None:
    torch.manual_seed(0)
    teacher = MetaWeightNet(hidden=100)
    assert [tuple(p.shape) for p in teacher.parameters()] == [(100, 1), (100,), (1, 100), (1,)]
    batch, logits = batch_of(12)
    weights = teacher(batch, view_of(logits, batch.y)).weights
    assert weights.sum().item() == pytest.approx(12.0)
    view = view_of(logits, batch.y)
    same_loss = view._replace(losses=torch.full((12,), 0.3))
    assert torch.allclose(teacher(batch, same_loss).weights, torch.ones(12))


def test_deep_interaction_inputs_follow_the_feature_choice() -> None:
    student = create_model("resnet8", 10, (3, 32, 32))
    states = student(torch.randn(5, 3, 32, 32), return_states=True)
    batch = Batch(torch.zeros(5), torch.tensor([0, 1, 2, 3, 9]), torch.arange(5))
    context = TeachingContext(30, 1, 120, torch.tensor(1.5), 0.4)
    losses = F.cross_entropy(states.logits, batch.y, reduction="none")
    view = StudentView(states.logits, losses, states.features, states.maps, context)
    widths = {"I0": 64, "I1": 64, "I2": 32, "I3": 16, "M0": 16, "M1": 14}
    for features in (["I0", "M0"], ["I1"], ["I2", "I3"], ["M1"], ["I0", "M0", "M1"]):
        teacher = DeepInteractionTeacher(10, student, features)
        inputs = teacher.inputs(batch, view)
        assert inputs.shape == (5, sum(widths[f] for f in features))
        assert torch.equal(
            teacher(batch, view).weights, torch.ones(5)
        )  # zero output layer: no preference yet
    surface = DeepInteractionTeacher(10, student, ["M1"]).inputs(batch, view)
    assert surface[0, :3].tolist() == pytest.approx(
        [0.25, 1.5, 0.4]
    )  # progress, average loss, best val acc
    assert torch.equal(surface[:, 3:13].argmax(1), states.logits.argmax(1))  # predicted label
    probs = states.logits.softmax(1)
    margin = probs[0, 0] - probs[0, 1:].max()
    assert surface[0, 13].item() == pytest.approx(margin.item(), abs=1e-6)
    i1 = DeepInteractionTeacher(10, student, ["I1"]).inputs(batch, view)
    assert torch.allclose(i1, states.maps[-1].mean(dim=(2, 3)))
    assert (
        len(DeepInteractionTeacher(10, student, ["I0"], hidden_layers=2).net) == 5
    )  # (Linear, ReLU) x 2, Linear


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"features": ["I4"]},
            "features must be distinct names among I0, I1, I2, I3, M0, M1, got \\['I4'\\]",
        ),
        ({"features": []}, "features must be distinct names"),
        ({"hidden_layers": 3}, "hidden_layers must be 0, 1 or 2"),
    ],
)
def test_deep_interaction_options_are_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeepInteractionTeacher(10, create_model("resnet8", 10, (3, 32, 32)), **kwargs)


def test_a_teacher_that_cannot_fit_the_student_is_a_config_error(make_config) -> None:
    with pytest.raises(
        ConfigError,
        match=r"teacher 'deep_interaction' \(teacher.name\) .*I3 needs a student with 3 stages; it has 1",
    ):
        Trainer(make_config("teacher.name=deep_interaction", "teacher.kwargs.features=[I3]"))


@pytest.mark.parametrize(
    ("teacher", "strategy"),
    [
        (["teacher.name=deep_interaction", "teacher.hypergrad.inner_steps=4"], Unrolled),
        (["teacher.name=learning_to_reweight"], ExampleGradients),
        (["teacher.name=focal", "teacher.kwargs.gamma=1.0"], StudentOnly),
        (["teacher.name=self_paced"], StudentOnly),
        (["teacher.name=random_filter", "teacher.kwargs.keep=0.7"], StudentOnly),
    ],
)
def test_each_teacher_trains_a_student(make_config, teacher: list[str], strategy: type) -> None:
    trainer = Trainer(
        make_config(*teacher, "train.epochs=3", "noise.type=symmetric", "noise.rate=0.2")
    )
    assert type(trainer.teaching.strategy) is strategy
    assert trainer.fit()["test/acc"] > 0.7
