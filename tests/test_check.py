"""Every route to a hypergradient, checked against central differences of the validation loss.

Two sweeps with :func:`metateach.check_hypergradient`, float64, rtol 1e-6:

* every registered teacher with every registered method that accepts it, both
  found from the registries at collection time, so that a teacher or method
  registered later is checked without a new test;
* teachers built to stress the lesson (a temperature and logit offsets inside
  ``loss_fn``, a mask with weights, states read with dw/dtheta kept) on a
  BatchNorm convolutional student, with dropout, Nesterov momentum, a
  learning rate that changes every step and on the first step of training.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach import HYPERGRADS, TEACHERS, Lesson, Teacher, check_hypergradient
from metateach.data import Batch
from metateach.engine.strategy import Differentiates, PerStepMethod
from metateach.lesson import StatesLoss
from metateach.models import create_model
from metateach.student import Student
from metateach.teacher import ExampleGradient, Hypergradient, StudentView
from metateach.teachers.large_margin import large_margin_loss

from .conftest import sample_record
from .hypergrad_fixtures import exercised

CLASSES = 3


def student_of(model: str = "mlp", dropout: float = 0.0) -> tuple[Student, tuple[int, ...]]:
    torch.manual_seed(0)
    if model == "mlp":
        shape = (1, 3, 3)
        return create_model("mlp", CLASSES, shape, {"hidden": [6, 5], "dropout": dropout}), shape
    shape = (1, 8, 8)
    return create_model(model, CLASSES, shape), shape


def data(shape: tuple[int, ...], steps: int = 6) -> tuple[list[tuple[Tensor, Tensor]], Batch]:
    """A training batch of 8 for each step and a validation batch of 10."""
    g = torch.Generator().manual_seed(1)

    def pair(n: int) -> tuple[Tensor, Tensor]:
        return torch.randn(n, *shape, generator=g), torch.randint(0, CLASSES, (n,), generator=g)

    return [pair(8) for _ in range(steps)], Batch(*pair(10), torch.arange(10))


# --------------------------------------------------------------------------- #
# Every registered teacher with every method that accepts it
# --------------------------------------------------------------------------- #

#: Options that keep a registered teacher small; a teacher not named here is built with its defaults.
#: MentorNet-DD fits its network on a sample record (it learns by no hypergradient: the
#: sweep leaves it out, and the checker refuses it).
SMALL: dict[str, dict[str, Any]] = {
    "mentornet_dd": {
        "record": str(sample_record(Path(tempfile.mkdtemp()) / "samples.npz")[1]),
        "fit": {"steps": 1},
    },
    "meta_weight_net": {"hidden": 5},
    "weight_decay": {"initial": 0.05},  # a decay whose share of the step the differences resolve
    "deep_interaction": {"features": ["I0", "M0", "M1"], "embedding_dim": 4},
    "l2t_dlf": {"hidden": 4},
    "l2t_dln": {"hidden": 4, "depth": 2, "init_steps": 30, "lstm_hidden": 3},
}

#: The settings under which the approximate methods become exact.
EXACT_OPTIONS: dict[str, dict[str, Any]] = {
    "finite_difference": {"epsilon": 1e-5},  # DARTS's difference, its error O(epsilon^2)
    "implicit": {"iterations": 50, "tolerance": 1e-14},  # a converged solve
}


def registered_teacher(name: str, student: Student) -> Teacher | None:
    teacher = TEACHERS.build(
        name,
        SMALL.get(name, {}),
        "teacher.kwargs",
        num_classes=CLASSES,
        student=student,
        new_student=lambda: student_of()[0],
        noise_rate=0.2,
        train_size=64,
        target_val_acc=0.9,
    )
    return None if teacher is None else exercised(teacher)


def cells() -> Iterator[tuple[str, str]]:
    """(teacher, method) for every registered teacher that learns by a hypergradient and every
    registered method that accepts it; Learning-to-Reweight's kind with its example gradients."""
    student, _ = student_of()
    for name in TEACHERS:
        teacher = registered_teacher(name, student)
        if teacher is None:
            continue
        if isinstance(teacher.learns, ExampleGradient):
            yield name, "example_gradient"
        elif isinstance(teacher.learns, Hypergradient):
            for method in HYPERGRADS:
                if HYPERGRADS.get(method).refuses(teacher) is None:
                    yield name, method


CELLS = list(cells())
#: Cells that take about a minute each (implicit's converged solve through a learned loss and
#: through the deep-interaction features): run by .ci/run with the slow tests.
SLOW_CELLS = {("l2t_dlf", "implicit"), ("deep_interaction", "implicit")}


def settings_for(method: str, student: Student) -> dict[str, Any]:
    """How a method is checked: K = 3, B = 2 for the windowed methods (a forward-mode first step,
    a second-order step, a truncation), one step for the others, at the optimum of a convex
    problem (the student's last layer alone trained) for ``implicit``."""
    settings: dict[str, Any] = {"options": EXACT_OPTIONS.get(method)}
    if method == "example_gradient":
        return settings
    method_class = HYPERGRADS.get(method)
    if not issubclass(method_class, PerStepMethod):
        settings.update(inner_steps=3, backprop_steps=2)
    if method_class.differentiates is Differentiates.OPTIMUM:
        for p in student.layers.parameters():
            p.requires_grad_(False)
        settings.update(lr=1.0, momentum=0.7, weight_decay=0.05, coordinates=4)
    if method_class.differentiates is Differentiates.ROUNDS:
        settings.update(lr=0.5)  # the learned optimizer's inner weights move the student measurably
    return settings


@pytest.mark.parametrize(
    ("teacher_name", "method"),
    [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CELLS else c for c in CELLS],
)
def test_every_registered_teacher_gets_its_exact_hypergradient_from_every_method(
    teacher_name: str, method: str
) -> None:
    student, shape = student_of()
    teacher = registered_teacher(teacher_name, student)
    assert teacher is not None
    batches, val = data(shape)
    settings = settings_for(method, student)
    check = check_hypergradient(
        teacher, student, batches, val, None if method == "example_gradient" else method, **settings
    )
    assert check.passed, str(check)
    assert max(float(t.central_difference.norm()) for t in check.tensors) > 1e-5  # a real signal


def test_the_sweep_reaches_every_teacher_that_learns_by_a_hypergradient() -> None:
    student, _ = student_of()
    swept = {t for t, _ in CELLS}
    for name in TEACHERS:
        teacher = registered_teacher(name, student)
        learns = None if teacher is None else teacher.learns
        if isinstance(learns, Hypergradient):
            assert (name, learns.method) in CELLS, name  # at least with its own method
        elif isinstance(learns, ExampleGradient):
            assert (name, "example_gradient") in CELLS
        else:
            assert name not in swept
    assert SLOW_CELLS.issubset(CELLS)  # the slow cells are swept too (by .ci/run)
    # Every method is swept, each with more than one teacher.
    for method in HYPERGRADS:
        assert [t for t, m in CELLS if m == method], method


def test_teachers_that_do_not_learn_by_a_hypergradient_are_refused_by_the_checker() -> None:
    student, shape = student_of()
    batches, val = data(shape)
    refused = 0
    for name in TEACHERS:
        teacher = registered_teacher(name, student)
        if teacher is None or isinstance(teacher.learns, Hypergradient | ExampleGradient):
            continue
        with pytest.raises(
            ValueError, match="learns by no hypergradient, and there is none to check"
        ):
            check_hypergradient(teacher, student, batches, val)
        refused += 1
    assert refused >= 4  # co-teaching, L2T, focal, self-paced, random filter


def test_a_method_that_cannot_teach_a_teacher_says_why() -> None:
    student, shape = student_of()
    batches, val = data(shape)
    dln = registered_teacher("l2t_dln", student)
    assert dln is not None
    with pytest.raises(
        ValueError,
        match="lookahead cannot teach DynamicLossTeacher: .* it needs teacher.hypergrad.method=learned_optimizer",
    ):
        check_hypergradient(dln, student, batches, val, "lookahead")
    mwn = registered_teacher("meta_weight_net", student)
    assert mwn is not None
    with pytest.raises(ValueError, match="needs a teacher whose lesson a learned optimizer writes"):
        check_hypergradient(mwn, student, batches, val, "learned_optimizer")


# --------------------------------------------------------------------------- #
# Students that learn with Adam and AdamW
# --------------------------------------------------------------------------- #

#: The optimizers the sweep below runs every method under (SGD is the sweeps' above).
ADAPTIVE = {
    "adam": {"betas": [0.8, 0.99]},
    "adamw": {"betas": [0.8, 0.99]},
    "rmsprop": {"kwargs": {"alpha": 0.9}},
}

#: Adam's steps are ~lr per coordinate whatever the gradient's scale: a smaller rate, changing.
ADAPTIVE_LR = [0.01, 0.02, 0.005, 0.015, 0.01]


def adaptive_cells() -> Iterator[Any]:
    """(optimizer, method, teacher): every method that differentiates an optimizer it is not
    built for (all but reversible; implicit not under AdamW's decoupled decay), each with
    Meta-Weight-Net where it teaches it, else the first teacher of the sweep above it
    teaches. Two rounds of L2T-DLN's learned optimizer take a minute: run by .ci/run."""
    for optimizer in ADAPTIVE:
        for method in [*HYPERGRADS, "example_gradient"]:
            if method == "reversible" or (method == "implicit" and optimizer == "adamw"):
                continue
            teachers = [t for t, m in CELLS if m == method]
            teacher = "meta_weight_net" if "meta_weight_net" in teachers else teachers[0]
            marks = [pytest.mark.slow] if method == "learned_optimizer" else []
            yield pytest.param(optimizer, method, teacher, marks=marks)


@pytest.mark.parametrize(("optimizer", "method", "teacher_name"), list(adaptive_cells()))
def test_every_method_gets_the_exact_hypergradient_of_an_adaptive_student(
    optimizer: str, method: str, teacher_name: str
) -> None:
    student, shape = student_of()
    teacher = registered_teacher(teacher_name, student)
    assert teacher is not None
    batches, val = data(shape)
    settings = {"lr": ADAPTIVE_LR, **settings_for(method, student)}
    if method == "learned_optimizer":
        # Two rounds under Adam move the validation loss by less: at h = 1e-6 the differences'
        # rounding (error ~ 1/h: 1.3e-3 relative at 1e-6, 1.2e-4 at 1e-5) swamps the
        # hypergradient of the LSTM's weights; at 3e-4 it falls below the check's tolerance.
        settings["step"] = 3e-4
    check = check_hypergradient(
        teacher,
        student,
        batches,
        val,
        None if method == "example_gradient" else method,
        optimizer=optimizer,
        optimizer_settings=ADAPTIVE[optimizer],
        **settings,
    )
    assert check.passed, str(check)
    assert max(float(t.central_difference.norm()) for t in check.tensors) > 1e-5


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize(
    ("regime", "method", "k", "b"),
    [
        ("first-step", "unrolled", 3, 2),  # from an empty state: the first steps' moments
        pytest.param("batchnorm-conv", "lookahead", 1, 1, marks=pytest.mark.slow),
        pytest.param("batchnorm-conv", "unrolled", 3, 2, marks=pytest.mark.slow),
    ],
)
def test_adaptive_students_from_the_first_step_and_with_batchnorm(
    optimizer: str, regime: str, method: str, k: int, b: int
) -> None:
    model = "resnet8" if regime == "batchnorm-conv" else "mlp"
    student, shape = student_of(model)
    batches, val = data(shape)
    check = check_hypergradient(
        StateReader(student),
        student,
        batches,
        val,
        method,
        inner_steps=k,
        backprop_steps=b,
        lr=ADAPTIVE_LR,
        optimizer=optimizer,
        optimizer_settings=ADAPTIVE[optimizer],
        warmup_steps=0 if regime == "first-step" else 2,
    )
    assert check.passed, str(check)
    assert max(float(t.central_difference.norm()) for t in check.tensors) > 1e-5


@pytest.mark.parametrize("method", ["lookahead", "unrolled"])
def test_a_gradient_that_is_always_zero_leaves_adams_hypergradient_finite(method: str) -> None:
    """An input pixel that is always 0 gives its weights a zero gradient, and without weight
    decay Adam's v stays 0 there, where sqrt has an infinite derivative: with PyTorch's
    eps_root = 0 the hypergradient is nan; the default 1e-30 gives the exact one."""
    student, shape = student_of()
    teacher = registered_teacher("meta_weight_net", student)
    assert teacher is not None
    batches, val = data(shape)
    for x, _ in batches:
        x[:, :, 0, 0] = 0
    found = {}
    for eps_root in (0.0, None):
        settings = {} if eps_root is None else {"kwargs": {"eps_root": eps_root}}
        found[eps_root] = check_hypergradient(
            teacher, student, batches, val, method,
            inner_steps=3 if method == "unrolled" else None,
            backprop_steps=2 if method == "unrolled" else None,
            lr=ADAPTIVE_LR, weight_decay=0.0, optimizer="adam", optimizer_settings=settings,
        )  # fmt: skip
    assert any(torch.isnan(t.hypergradient).any() for t in found[0.0].tensors)
    assert found[None].passed, str(found[None])


@pytest.mark.parametrize(
    ("optimizer", "method", "says"),
    [
        ("adam", "reversible", "reversible runs momentum SGD backwards: it needs optim.name=sgd"),
        (
            "adamw",
            "implicit",
            "optim.name=adamw with decoupled weight decay comes to rest elsewhere",
        ),
    ],
)
def test_methods_that_cannot_differentiate_an_optimizer_say_why(
    optimizer: str, method: str, says: str
) -> None:
    student, shape = student_of()
    batches, val = data(shape)
    teacher = registered_teacher("meta_weight_net", student)
    assert teacher is not None
    with pytest.raises(ValueError, match=says):
        check_hypergradient(
            teacher,
            student,
            batches,
            val,
            method,
            optimizer=optimizer,
            **settings_for(method, student),
        )


# --------------------------------------------------------------------------- #
# Teachers built to stress the lesson
# --------------------------------------------------------------------------- #


class Temperature(Teacher):
    """The loss is cross-entropy at a learned temperature: the teacher's parameter acts before the softmax."""

    learns = Hypergradient("lookahead")

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        scale = self.log_scale.exp()
        return Lesson(
            loss_fn=lambda logits, y: F.cross_entropy(scale * logits, y, reduction="none")
        )


class LogitOffsets(Teacher):
    """Cross-entropy of the logits shifted by a learned offset per class."""

    learns = Hypergradient("lookahead")

    def __init__(self) -> None:
        super().__init__()
        self.offsets = nn.Parameter(torch.tensor([0.4, -0.3, 0.1]))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        offsets = self.offsets
        return Lesson(
            loss_fn=lambda logits, y: F.cross_entropy(logits + offsets, y, reduction="none")
        )


class MaskedWeights(Teacher):
    """The easier half of the batch, weighted by a learned function of the loss, with a focal loss."""

    learns = Hypergradient("lookahead")

    def __init__(self) -> None:
        super().__init__()
        self.slope = nn.Parameter(torch.tensor(-0.7))
        self.shift = nn.Parameter(torch.tensor(0.2))
        self.gamma = nn.Parameter(torch.tensor(0.5))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        losses = view.losses
        mask = losses <= losses.median()
        gamma = self.gamma

        def focal(logits: Tensor, y: Tensor) -> Tensor:
            log_p = F.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
            return -((1 - log_p.exp()) ** gamma.exp()) * log_p

        return Lesson.weighted(torch.sigmoid(self.slope * losses + self.shift), mask, focal)


class StateReader(Teacher):
    """Weights from the student's features, its first stage's maps and its logits' margin."""

    learns = Hypergradient("unrolled", inner_steps=3, backprop_steps=2)

    def __init__(self, student: Student) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.features = nn.Parameter(0.3 * torch.randn(student.feature_dim, generator=g))
        self.maps = nn.Parameter(0.3 * torch.randn(student.map_shapes[0][0], generator=g))
        self.margin = nn.Parameter(torch.tensor(0.5))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        first = view.maps[0]
        pooled = first.flatten(2).mean(dim=2) if first.dim() > 2 else first
        top2 = view.logits.topk(2, dim=1).values
        score = view.features @ self.features + pooled @ self.maps
        return Lesson.weighted(torch.sigmoid(score + self.margin * (top2[:, 0] - top2[:, 1])))


class HeadMargin(Teacher):
    """Large-margin softmax (m = 2) with a learned annealing weight: a loss of the features and
    of the head's weight itself (a :class:`StatesLoss`), not of the logits alone."""

    learns = Hypergradient("lookahead")

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.tensor(0.3))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        lam = F.softplus(self.mix)
        return Lesson(loss_fn=StatesLoss(partial(large_margin_loss, margin=2, lam=lam)))


STRESS: dict[str, Callable[[Student], Teacher]] = {
    "temperature": lambda s: Temperature(),
    "logit-offsets": lambda s: LogitOffsets(),
    "mask-and-weights": lambda s: MaskedWeights(),
    "states": StateReader,
    "head-margin": lambda s: HeadMargin(),
}

#: Student and optimizer settings: name -> (model, dropout, check_hypergradient's settings).
REGIMES: dict[str, tuple[str, float, dict[str, Any]]] = {
    "mlp": ("mlp", 0.0, {}),
    "batchnorm-conv": ("resnet8", 0.0, {}),
    "dropout": ("mlp", 0.3, {}),
    "nesterov": ("mlp", 0.0, {"nesterov": True}),
    "lr-each-step": ("mlp", 0.0, {"lr": [0.1, 0.05, 0.2, 0.15, 0.08]}),
    "first-step": ("mlp", 0.0, {"warmup_steps": 0}),
    "keep-weight-grad": ("mlp", 0.0, {"keep_weight_grad": True}),
}

#: Methods with their K and B.
WINDOWS = {
    "lookahead": ("lookahead", 1, 1),
    "unrolled-3-2": ("unrolled", 3, 2),
    "reversible-3-2": ("reversible", 3, 2),
    "finite_difference": ("finite_difference", 1, 1),
}


#: Every combination but reversible under Nesterov, which it refuses (it runs plain momentum backwards).
STRESSED = [
    (teacher, regime, window)
    for teacher in STRESS
    for regime in REGIMES
    for window in WINDOWS
    if not (window.startswith("reversible") and regime == "nesterov")
]


@pytest.mark.parametrize(("teacher_name", "regime", "window"), STRESSED)
def test_stressed_lessons_get_exact_hypergradients(
    teacher_name: str, regime: str, window: str
) -> None:
    model, dropout, settings = REGIMES[regime]
    method, k, b = WINDOWS[window]
    student, shape = student_of(model, dropout)
    batches, val = data(shape)
    check = check_hypergradient(
        STRESS[teacher_name](student),
        student,
        batches,
        val,
        method,
        inner_steps=k,
        backprop_steps=b,
        options=EXACT_OPTIONS.get(method),
        **settings,
    )
    assert check.passed, str(check)
    assert max(float(t.central_difference.norm()) for t in check.tensors) > 1e-5


@pytest.mark.parametrize(
    ("method", "k", "b"),
    [
        ("lookahead", 1, 1),
        ("unrolled", 1, 1),
        ("unrolled", 3, 3),
        ("unrolled", 3, 2),
        ("reversible", 1, 1),
        ("reversible", 3, 3),
    ],
)
def test_a_learned_temperature_gets_the_finite_difference_value(
    method: str, k: int, b: int
) -> None:
    # The reproduction that found the forward-mode route wrong: lookahead gave +0.0269 and
    # unrolled and reversible +0.0037 where central differences gave +0.0162.
    student, shape = student_of()
    batches, val = data(shape)
    check = check_hypergradient(
        Temperature(), student, batches, val, method, inner_steps=k, backprop_steps=b
    )
    (scale,) = check.tensors
    assert abs(float(scale.central_difference)) > 1e-3
    assert scale.rel_error < 1e-6, str(check)


@pytest.fixture
def flush_denormal() -> Iterator[None]:
    """Subnormal float64s (below 2.2e-308) read as zero, for the duration of a test.

    Over the flattened maps, the windowed methods' float64 replays meet subnormal
    numbers, which the CPU computes on 20-40 times slower (10 s become 7 minutes);
    values that small change no difference the check compares at 1e-6.
    """
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize("method", ["reversible", "unrolled", "lookahead"])
@pytest.mark.parametrize("map_grid", [None, 2], ids=["flattened", "grid 2x2"])
def test_the_deep_interaction_levels_get_exact_hypergradients_on_a_batchnorm_resnet(
    method: str, map_grid: int | None, flush_denormal: None
) -> None:
    """I1, I2 and I3 as the teacher reads them, the maps of a BatchNorm ResNet's three stages."""
    student, shape = student_of("resnet8")
    teacher = exercised(
        TEACHERS.build(
            "deep_interaction",
            {"features": ["I1", "I2", "I3", "M0"], "embedding_dim": 4, "map_grid": map_grid},
            "teacher.kwargs",
            num_classes=CLASSES,
            student=student,
        )
    )
    batches, val = data(shape)
    check = check_hypergradient(
        teacher, student, batches, val, method, **settings_for(method, student)
    )
    assert check.passed, str(check)
    assert max(float(t.central_difference.norm()) for t in check.tensors) > 1e-5
