"""The optimizer's step as a lesson: step settings applied, checked and differentiated."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from metateach import TEACHERS, Lesson, Teacher, check_hypergradient
from metateach.data import Batch
from metateach.engine import BilevelProblem
from metateach.errors import NonFiniteStep
from metateach.lesson import StepSettings
from metateach.optim import build_optimizer
from metateach.teacher import Hypergradient, StudentView
from metateach.teachers.step_settings import knot_curve, parameter_groups

from .hypergrad_fixtures import context, exercised, make_batch
from .test_check import data, student_of


class EveryStepSetting(Teacher):
    """Sample weights and every step setting from one hidden layer over the student's features:
    the lesson's loss and its step share the teacher's graph."""

    learns = Hypergradient("unrolled")
    teaches_step = True

    def __init__(self, feature_dim: int, names: list[str], momentum: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.hidden = nn.Parameter(0.3 * torch.randn(feature_dim, generator=g))
        self.scale = nn.Parameter(torch.tensor(0.2))
        self.decay = nn.Parameter(torch.tensor([-3.0, -2.0]))
        self.mu = nn.Parameter(torch.tensor(0.5))
        self.names, self.momentum = names, momentum

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        h = torch.tanh(view.features @ self.hidden)
        lr_scale = torch.exp(self.scale + 0.1 * h.mean())
        decay = {n: self.decay[i % 2].exp() for i, n in enumerate(self.names)}
        momentum = torch.sigmoid(self.mu + h.mean()) if self.momentum else None
        step = StepSettings(lr_scale, decay, momentum)
        return Lesson(weights=torch.sigmoid(h), step=step)


def _names(student: nn.Module) -> list[str]:
    return [k for k, p in student.named_parameters() if p.requires_grad]


#: Every route that differentiates a step, under momentum SGD and under Adam and AdamW (whose
#: weight decay is injected around TorchOpt's update; reversible runs momentum SGD alone).
ROUTES = [
    (method, optimizer)
    for method in ("unrolled", "reversible", "lookahead", "finite_difference")
    for optimizer in ("sgd", "adam", "adamw")
    if method != "reversible" or optimizer == "sgd"
]


@pytest.mark.parametrize(("method", "optimizer"), ROUTES)
def test_every_step_setting_gets_its_exact_hypergradient(method: str, optimizer: str) -> None:
    student, shape = student_of()
    # The last two parameters only, so that some keep the optimizer's own decay.
    teacher = EveryStepSetting(5, _names(student)[-2:], momentum=optimizer == "sgd")
    batches, val = data(shape)
    windowed = method in ("unrolled", "reversible")
    check = check_hypergradient(
        teacher, student, batches, val, method,
        inner_steps=3 if windowed else 1, backprop_steps=2 if windowed else 1,
        options={"epsilon": 1e-5} if method == "finite_difference" else None,
        optimizer=optimizer, lr=[0.1, 0.05, 0.08] if optimizer == "sgd" else [0.01, 0.02],
    )  # fmt: skip
    assert check.passed, str(check)
    by_name = {t.name: float(t.central_difference.norm()) for t in check.tensors}
    assert by_name["scale"] > 1e-5 and by_name["decay"] > 1e-7
    if optimizer == "sgd":
        assert by_name["mu"] > 1e-5


def test_implicit_refuses_a_teacher_of_the_step() -> None:
    student, shape = student_of()
    batches, val = data(shape)
    with pytest.raises(ValueError, match="implicit differentiates the optimum"):
        check_hypergradient(TEACHERS.build("lr_schedule", {}, "teacher.kwargs"), student,
                            batches, val, "implicit")  # fmt: skip


def _problem(teacher: Teacher | None, optimizer: str = "sgd") -> BilevelProblem:
    student, _ = student_of()
    student = student.double()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = build_optimizer(optimizer, params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    return BilevelProblem(student, opt, teacher)


class Fixed(Teacher):
    teaches_step = True

    def __init__(self, step: StepSettings) -> None:
        super().__init__()
        self.step = step

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(step=self.step)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_real_step_under_step_settings_is_the_optimizer_step_with_those_settings(
    optimizer: str,
) -> None:
    """Two real steps with lr x 0.5 and one parameter's decay at 0.2 equal torch.optim's steps
    with a parameter group each, set so."""
    problem = _problem(None, optimizer)
    names = _names(problem.student)
    step = StepSettings(
        torch.tensor(0.5, dtype=torch.float64), {names[0]: torch.tensor(0.2, dtype=torch.float64)}
    )
    reference = copy.deepcopy(problem.student)
    taught = BilevelProblem(problem.student, problem.optimizer, Fixed(step))
    groups = [{"params": [p]} for p in reference.parameters()]
    if optimizer == "sgd":
        torch_opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        torch_opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=1e-3)
    torch_opt.param_groups[0]["weight_decay"] = 0.2
    for seed in (1, 2):
        batch = make_batch(8, seed)
        taught.real_step(batch, context())
        loss = torch.nn.functional.cross_entropy(reference(batch.x), batch.y)
        torch_opt.zero_grad()
        loss.backward()
        torch_opt.step()
    for (name, mine), theirs in zip(
        problem.student.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14, msg=name)


def test_step_settings_are_checked_with_the_name_or_shape_at_fault() -> None:
    with pytest.raises(ValueError, match=r"lr_scale must be a 0-dim tensor, got \(2,\)"):
        StepSettings(lr_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"weight_decay\[w\] must be a 0-dim tensor"):
        StepSettings(weight_decay={"w": 0.1})  # type: ignore[dict-item]
    problem = _problem(Fixed(StepSettings(weight_decay={"nope": torch.tensor(0.1)})))
    with pytest.raises(ValueError, match=r"names \['nope'\], which are not trainable parameters"):
        problem.real_step(make_batch(8, 1), context())


def test_a_teacher_that_sets_the_step_must_declare_it() -> None:
    class Undeclared(Fixed):
        teaches_step = False

    problem = _problem(Undeclared(StepSettings(lr_scale=torch.tensor(0.5, dtype=torch.float64))))
    with pytest.raises(TypeError, match="Undeclared sets the optimizer's step: its class must"):
        problem.real_step(make_batch(8, 1), context())


def test_momentum_is_refused_where_the_optimizer_has_none_to_set() -> None:
    problem = _problem(Fixed(StepSettings(momentum=torch.tensor(0.5, dtype=torch.float64))), "adam")
    with pytest.raises(ValueError, match="a lesson's momentum is momentum SGD's"):
        problem.real_step(make_batch(8, 1), context())


def test_the_learned_schedule_interpolates_its_knots_and_starts_as_the_configured_one() -> None:
    values = torch.tensor([0.0, 1.0, -1.0])
    assert float(knot_curve(values, 0.0)) == 0.0
    assert float(knot_curve(values, 0.25)) == pytest.approx(0.5)
    assert float(knot_curve(values, 0.75)) == pytest.approx(0.0)
    assert float(knot_curve(values, 1.0)) == -1.0
    teacher = TEACHERS.build("lr_schedule", {"knots": 4}, "teacher.kwargs")
    assert float(teacher.scale_at(0.3).detach()) == 1.0  # log-scale 0: the schedule unchanged


def test_learned_weight_decay_groups_the_students_parameters() -> None:
    student, _ = student_of()
    names = _names(student)
    by_layer = parameter_groups(student, "layer")
    assert sum(len(v) for v in by_layer.values()) == len(names)
    assert set(parameter_groups(student, "kind")) == {"weights", "other"}
    teacher = TEACHERS.build("weight_decay", {"initial": 0.01, "groups": "kind"}, "teacher.kwargs",
                             student=student)  # fmt: skip
    zero = torch.zeros(1)
    lesson = teacher(make_batch(2, 0), StudentView(zero, zero, zero, (), context()))
    assert lesson.step is not None and set(lesson.step.weight_decay or {}) == set(names)
    assert all(
        math.isclose(float(v.detach()), 0.01, rel_tol=1e-6)
        for v in lesson.step.weight_decay.values()
    )
    with pytest.raises(ValueError, match="takes one of 'layer', 'kind', 'all'"):
        TEACHERS.build("weight_decay", {"groups": "module"}, "teacher.kwargs", student=student)


def test_the_controller_reads_the_students_state_and_keeps_its_rate_within_bounds() -> None:
    teacher = TEACHERS.build("lr_controller", {"max_scale": 4.0}, "teacher.kwargs")
    losses = torch.tensor([0.5, 1.5])
    zero = torch.zeros(1)

    def view(grad_norm: Tensor | None) -> StudentView:
        return StudentView(zero, losses, zero, (), context(10)._replace(grad_norm=grad_norm))

    first = teacher.state(view(None))
    assert first.tolist() == pytest.approx([0.1, math.log(2.0), 0.5, math.log(2.0), 0.0])
    assert teacher.state(view(torch.tensor(3.0)))[4] == pytest.approx(math.log(4.0))
    lesson = teacher(make_batch(2, 0), view(None))
    assert lesson.weights is None and float(lesson.step.lr_scale.detach()) == 1.0  # as configured
    exercised(teacher)
    near, far = (float(teacher(make_batch(2, 0), view(torch.tensor(g))).step.lr_scale.detach())
                 for g in (0.1, 5.0))  # fmt: skip
    assert near != far  # the gradient norm moves the rate
    with torch.no_grad():
        teacher.net[2].bias.fill_(100.0)
    assert float(teacher.scale(first).detach()) == pytest.approx(4.0)  # bounded by max_scale
    with pytest.raises(ValueError, match="teacher.kwargs.max_scale must be > 1"):
        TEACHERS.build("lr_controller", {"max_scale": 0.5}, "teacher.kwargs")


def test_a_real_step_leaves_its_gradient_norm_for_the_next_context() -> None:
    problem = _problem(Fixed(StepSettings(lr_scale=torch.tensor(0.5, dtype=torch.float64))))
    noted: list[dict[str, float]] = []
    problem.record = lambda **values: noted.append(values)
    batch = make_batch(8, 1)
    assert problem.grad_norm is None
    params = problem.params()
    loss = problem.train_loss(params, batch, context(), real=False).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    expected = torch.cat([g.flatten() for g in grads]).norm()
    problem.real_step(batch, context())
    assert float(problem.grad_norm) == pytest.approx(float(expected), rel=1e-12)
    assert noted == [{"train/lr_scale": 0.5}]  # the factor the step took


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300])
def test_a_step_on_a_non_finite_gradient_is_refused_and_changes_nothing(bad: float) -> None:
    # 1e300 is finite, but its square overflows: the norm the check reads is inf.
    problem = _problem(None)
    problem.real_step(make_batch(8, 1), context())
    before = {k: p.detach().clone() for k, p in problem.params().items()}
    norm_before = problem.grad_norm
    grads = [torch.zeros_like(p) for p in before.values()]
    grads[-1].view(-1)[0] = bad
    with pytest.raises(NonFiniteStep, match="not finite"):
        problem.step_on(grads, torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(NonFiniteStep, match="not finite"):  # or the loss is not
        problem.step_on([torch.zeros_like(g) for g in grads], torch.tensor(math.nan))
    assert all(torch.equal(p, before[k]) for k, p in problem.params().items())
    assert problem.grad_norm is norm_before


def test_a_resumed_controller_run_ends_exactly_like_an_uninterrupted_one(make_config) -> None:
    from metateach.trainer import Trainer

    from .conftest import without_measurements

    common = ("train.epochs=2", "data.train_subset=400", "teacher.name=lr_controller",
              "teacher.kwargs.hidden=4", "teacher.hypergrad.inner_steps=3",
              "teacher.hypergrad.backprop_steps=3", "optim.momentum=0.9")  # fmt: skip
    straight = Trainer(make_config(*common, "train.run_name=straight"))
    expected = straight.fit()
    first = Trainer(make_config(*common, "train.run_name=cut"))
    first.fit(max_steps=9)  # inside epoch 2: the resumed step reads the saved gradient norm
    assert first.state.step == 9 and first.teaching.strategy.problem.grad_norm is not None
    resumed = Trainer(make_config(*common, f"train.resume={first.run_dir}"))
    assert torch.equal(
        resumed.teaching.strategy.problem.grad_norm, first.teaching.strategy.problem.grad_norm
    )
    final = resumed.fit()
    assert without_measurements(final) == without_measurements(expected)
    for a, c in zip(straight.teaching.teacher.parameters(), resumed.teaching.teacher.parameters(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, c)


@pytest.mark.slow  # a whole training run: run by .ci/run
def test_a_run_of_the_learned_schedule_trains_it_and_draws_its_curve(make_config) -> None:
    from metateach.trainer import Trainer

    trainer = Trainer(make_config(
        "teacher.name=lr_schedule", "teacher.kwargs.knots=3", "teacher.optim.lr=0.05",
        "teacher.hypergrad.inner_steps=4", "teacher.hypergrad.backprop_steps=4",
        "optim.momentum=0.9", "logging.plots=true",
    ))  # fmt: skip
    trainer.fit()
    last = trainer.state.history[-1]
    knots = [last[f"teacher/lr_scale/knot_{i:02d}"] for i in range(3)]
    assert knots[0] != 1.0 and knots[1] != 1.0  # the knots the run passed have learned
    assert last["train/lr_scale"] != 1.0  # the mean scale the last epoch's steps took
    assert (trainer.run_dir / "step_settings.png").stat().st_size > 10_000
