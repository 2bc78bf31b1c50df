"""Every hypergradient method, proven on a tiny float64 problem.

The exact methods must match central finite differences of the validation
loss after the same student steps (relative error below 1e-4); ``unrolled``
and ``reversible`` must agree with each other (1e-6) and ``unrolled`` with
an independent computation in ``higher``; the approximate methods are held
to the exact one with the tolerances stated in each test.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import higher
import pytest
import torch
import torch.nn.functional as F

from metateach.data import Batch, WholeSplit
from metateach.engine.meter import UpdateMeter
from metateach.engine.problem import BilevelProblem
from metateach.engine.tangent import ForwardRecord
from metateach.errors import ConfigError
from metateach.hypergrad.example_gradient import example_gradient
from metateach.hypergrad.finite_difference import FiniteDifference
from metateach.hypergrad.implicit import Implicit
from metateach.hypergrad.lookahead import Lookahead
from metateach.hypergrad.reversible import Reversible
from metateach.hypergrad.unrolled import Unrolled
from metateach.lesson import lesson_loss
from metateach.teachers import DeepInteractionTeacher, MetaWeightNet
from metateach.trainer import Trainer

from .hypergrad_fixtures import CLASSES, Setup, context


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def mlp() -> Setup:
    return Setup("mlp")


@pytest.mark.parametrize("keep_weight_grad", [False, True], ids=["dw/dtheta=0", "dw/dtheta-kept"])
@pytest.mark.parametrize(
    ("name", "make", "steps"),
    [
        ("unrolled K=B=4", lambda p: Unrolled(p, 4, 4), 4),
        ("reversible K=B=4", lambda p: Reversible(p, 4, 4), 4),
        ("lookahead", lambda p: Lookahead(p), 1),
    ],
)
def test_exact_methods_match_finite_differences(
    mlp: Setup, name: str, make, steps: int, keep_weight_grad: bool
) -> None:
    exact = mlp.hypergradient(make, steps, keep_weight_grad)
    numeric = mlp.finite_difference(steps, keep_weight_grad)
    assert exact.norm() > 1e-4  # a real signal, not two zeros agreeing
    assert relative_error(exact, numeric) < 1e-4, name


def test_keeping_dw_dtheta_changes_the_hypergradient(mlp: Setup) -> None:
    detached = mlp.hypergradient(lambda p: Unrolled(p, 3, 3), 3)
    kept = mlp.hypergradient(lambda p: Unrolled(p, 3, 3), 3, keep_weight_grad=True)
    assert relative_error(kept, detached) > 1e-3


@pytest.mark.parametrize(("k", "b"), [(5, 2), (4, 4), (6, 1)])
def test_unrolled_and_reversible_agree_for_the_same_window(mlp: Setup, k: int, b: int) -> None:
    unrolled = mlp.hypergradient(lambda p: Unrolled(p, k, b), k)
    reversible = mlp.hypergradient(lambda p: Reversible(p, k, b), k)
    assert relative_error(reversible, unrolled) < 1e-6


def test_truncation_drops_the_early_steps(mlp: Setup) -> None:
    full = mlp.hypergradient(lambda p: Unrolled(p, 5, 5), 5)
    truncated = mlp.hypergradient(lambda p: Unrolled(p, 5, 2), 5)
    assert relative_error(truncated, full) > 1e-3  # B < K is a different (truncated) gradient


def test_reversible_reports_its_reconstruction_error(mlp: Setup) -> None:
    mlp.reset()
    method = Reversible(mlp.problem(), 4, 3)
    for t in range(4):
        method.step(mlp.batches[t], context(t))
    metrics = method.pop_metrics()
    assert 0 <= metrics["teacher/reconstruction_error"] < 1e-12  # float64 reverses almost exactly
    assert metrics["teacher/graph_mb"] > 0 and metrics["teacher/update_seconds"] > 0


def higher_hypergradient(setup: Setup, k: int, b: int, keep_weight_grad: bool = False):
    """The hypergradient of K steps truncated to the last B, computed independently with ``higher``.

    K - B plain steps with torch's SGD under the teacher's lessons, then B
    steps of higher's differentiable SGD from a copy of the weights, then
    the validation loss differentiated to the teacher. Dropout draws from
    the global stream in the engine's order (each step's pass, then the
    validation pass).
    """
    setup.reset()
    problem = setup.problem(keep_weight_grad)
    teacher_params = list(setup.teacher.parameters())

    def lesson_loss_of(model, t: int) -> torch.Tensor:
        batch = setup.batches[t]
        states = model(batch.x, return_states=True)
        view = problem.view(states, batch, context(t))
        return lesson_loss(setup.teacher(batch, view), states.logits, batch.y)

    for t in range(k - b):
        setup.optimizer.zero_grad()
        lesson_loss_of(setup.student, t).backward()
        setup.optimizer.step()
    with higher.innerloop_ctx(setup.student, setup.optimizer, copy_initial_weights=True) as (
        fmodel,
        diffopt,
    ):
        for t in range(k - b, k):
            diffopt.step(lesson_loss_of(fmodel, t))
        val_loss = F.cross_entropy(fmodel(setup.val.x), setup.val.y)
        grads = torch.autograd.grad(val_loss, teacher_params)
    setup.reset()
    return torch.cat([g.reshape(-1) for g in grads])


def test_unrolled_matches_higher(mlp: Setup) -> None:
    k = 4
    ours = mlp.hypergradient(lambda p: Unrolled(p, k, k), k)
    assert relative_error(ours, higher_hypergradient(mlp, k, k)) < 1e-8


@pytest.mark.parametrize(
    ("model", "nesterov", "dropout"),
    [("resnet8", False, 0.0), ("resnet8", True, 0.0), ("mlp", True, 0.3)],
    ids=["batchnorm", "batchnorm-nesterov", "dropout-nesterov"],
)
@pytest.mark.parametrize("keep_weight_grad", [False, True], ids=["dw/dtheta=0", "dw/dtheta-kept"])
@pytest.mark.parametrize(
    ("name", "make", "k", "b"),
    [
        ("lookahead", lambda p: Lookahead(p), 1, 1),
        ("unrolled K=B=1", lambda p: Unrolled(p, 1, 1), 1, 1),
        ("unrolled K=3 B=2", lambda p: Unrolled(p, 3, 2), 3, 2),
    ],
)
def test_forward_mode_teacher_terms_match_higher(
    name: str,
    make,
    k: int,
    b: int,
    model: str,
    nesterov: bool,
    dropout: float,
    keep_weight_grad: bool,
) -> None:
    # The first differentiated step's teacher term is taken in forward mode (lookahead's only
    # step; unrolled's first of B). Against higher's graph through the same steps: BatchNorm
    # couples the samples, Nesterov changes the step's scale, dropout must draw the same masks.
    setup = Setup(model, nesterov=nesterov, dropout=dropout)
    torch.manual_seed(1)
    reference = higher_hypergradient(setup, k, b, keep_weight_grad)
    torch.manual_seed(1)
    ours = setup.hypergradient(make, k, keep_weight_grad)
    assert reference.norm() > 1e-6
    assert relative_error(ours, reference) < 1e-9, name


@pytest.mark.parametrize(("model", "dropout"), [("resnet8", 0.0), ("mlp", 0.3)])
def test_reversible_with_its_forward_mode_first_step_matches_higher(
    model: str, dropout: float
) -> None:
    # The reversed run's last step (the window's first) is taken in forward mode too.
    setup = Setup(model, dropout=dropout)
    torch.manual_seed(1)
    reference = higher_hypergradient(setup, 4, 3)
    torch.manual_seed(1)
    ours = setup.hypergradient(lambda p: Reversible(p, 4, 3), 4)
    assert relative_error(ours, reference) < 1e-7


@pytest.mark.parametrize("b", [2, 3])
def test_reversible_replays_only_the_steps_between_the_windows_first_and_last(
    b: int, monkeypatch
) -> None:
    # The last step keeps its real pass's graph and the first step's teacher term reuses its
    # recorded forward pass (BatchNorm's too): B = 2 recomputes no training pass, B = 3 one.
    setup = Setup("resnet8")
    replays, tangent_passes = [], []
    train_loss, replay = BilevelProblem.train_loss, ForwardRecord.replay

    def counted_train_loss(self, *args, real: bool, **kwargs):
        replays.append(real)
        return train_loss(self, *args, real=real, **kwargs)

    def counted_replay(self):
        tangent_passes.append(self)
        return replay(self)

    monkeypatch.setattr(BilevelProblem, "train_loss", counted_train_loss)
    monkeypatch.setattr(ForwardRecord, "replay", counted_replay)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a record the pass cannot reuse warns
        ours = setup.hypergradient(lambda p: Reversible(p, 4, b), 4)
    assert replays.count(False) == b - 2
    assert len(tangent_passes) == 1
    monkeypatch.undo()
    assert relative_error(ours, setup.hypergradient(lambda p: Unrolled(p, 4, b), 4)) < 1e-6


def test_finite_difference_approximates_lookahead(mlp: Setup) -> None:
    exact = mlp.hypergradient(lambda p: Lookahead(p), 1)
    errors = {
        eps: relative_error(
            mlp.hypergradient(lambda p, e=eps: FiniteDifference(p, epsilon=e), 1), exact
        )
        for eps in (1e-2, 1e-3, 1e-5)  # 1e-2 is DARTS's choice
    }
    assert errors[1e-2] < 0.1
    assert errors[1e-2] / errors[1e-3] > 50  # the central difference's error falls as eps^2
    assert errors[1e-5] < 1e-6


def test_implicit_is_exact_at_an_optimum() -> None:
    # A strongly convex inner problem: multinomial logistic regression with
    # weight decay, trained on one batch to its optimum. There the implicit
    # function theorem gives the derivative of L_val(theta*(omega)), which a
    # finite difference over re-solved optima checks.
    setup = Setup("mlp", lr=1.0, momentum=0.7, weight_decay=0.05)
    batch = setup.batches[0]

    def solve(shift: torch.Tensor | None = None) -> None:
        setup.reset(shift)
        problem = setup.problem()
        for _ in range(300):  # to a gradient norm near 1e-16
            problem.real_step(batch, context())

    # Only the head is trained (the hidden layer is frozen), so the problem is convex.
    for p in setup.student.layers.parameters():
        p.requires_grad_(False)
    setup.optimizer = torch.optim.SGD(
        [p for p in setup.student.parameters() if p.requires_grad],
        lr=1.0,
        momentum=0.7,
        weight_decay=0.05,
    )
    for _ in range(2):
        setup.problem().real_step(batch, context())
    setup.snapshot = setup.state()

    def val_at_optimum(shift: torch.Tensor) -> float:
        solve(shift)
        params = dict(setup.student.named_parameters())
        return float(setup.problem().val_loss(params, setup.val).detach())

    n = sum(p.numel() for p in setup.teacher.parameters())
    numeric = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1e-5
        numeric[i] = (val_at_optimum(e) - val_at_optimum(-e)) / 2e-5

    def implicit_at_optimum(**options: object) -> torch.Tensor:
        solve()
        setup.snapshot = setup.state()
        setup.batches[0] = batch
        return setup.hypergradient(lambda p: Implicit(p, **options), 1)

    cg = implicit_at_optimum(solver="cg", iterations=50)
    assert relative_error(cg, numeric) < 1e-4
    neumann = implicit_at_optimum(solver="neumann", iterations=400, alpha=0.5)
    assert relative_error(neumann, numeric) < 1e-2


def test_a_nonfinite_hypergradient_skips_the_teacher_step_and_is_counted(mlp: Setup) -> None:
    mlp.reset()
    method = Lookahead(mlp.problem())
    before = [p.clone() for p in mlp.teacher.parameters()]
    method.update_teacher([torch.full_like(p, float("nan")) for p in mlp.teacher.parameters()])
    assert method.skipped == 1 and method.pop_metrics()["teacher/skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, mlp.teacher.parameters(), strict=True))


def test_virtual_passes_leave_batchnorm_statistics_to_the_real_step() -> None:
    setup = Setup("resnet8")
    for make in (
        lambda p: Lookahead(p),
        lambda p: Unrolled(p, 2, 2),
        lambda p: Reversible(p, 2, 2),
    ):
        setup.reset()
        method = make(setup.problem())
        for t in range(2):
            method.step(setup.batches[t], context(t))
        taught = {k: v.clone() for k, v in setup.student.state_dict().items()}
        setup.reset()
        problem = setup.problem()
        for t in range(2):
            problem.real_step(setup.batches[t], context(t))
        plain = setup.student.state_dict()
        for key in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
            assert torch.equal(taught[key], plain[key]), key


def deep_interaction(features: tuple[str, ...], hidden_layers: int = 0):
    return lambda student: DeepInteractionTeacher(
        CLASSES, student, features, hidden_layers, embedding_dim=4
    )


@pytest.mark.parametrize(
    ("features", "hidden_layers"),
    [(("I0", "M0"), 0), (("I1", "I2", "M0", "M1"), 1), (("M1",), 2)],
    ids=["I0+M0 MLP-0", "I1+I2+M0+M1 MLP-1", "M1 MLP-2"],
)
@pytest.mark.parametrize("method", ["unrolled", "reversible"])
def test_the_deep_interaction_teacher_gets_exact_hypergradients(
    features, hidden_layers: int, method: str
) -> None:
    # Three hidden layers: the last is I0, the two before it I1 and I2.
    setup = Setup("mlp", teacher=deep_interaction(features, hidden_layers), hidden=(4, 6, 5))
    make = (
        (lambda p: Unrolled(p, 3, 3)) if method == "unrolled" else (lambda p: Reversible(p, 3, 3))
    )
    exact = setup.hypergradient(make, 3)
    assert exact.norm() > 1e-5
    assert relative_error(exact, setup.finite_difference(3)) < 1e-4


def test_meta_weight_net_gets_the_exact_lookahead_hypergradient() -> None:
    setup = Setup("mlp", teacher=lambda student: MetaWeightNet(hidden=5))
    exact = setup.hypergradient(lambda p: Lookahead(p), 1)
    assert exact.norm() > 1e-6
    assert relative_error(exact, setup.finite_difference(1)) < 1e-4


def test_example_gradients_match_finite_differences_of_per_sample_weights(mlp: Setup) -> None:
    # Learning-to-Reweight's signal: d L_val(theta'(eps)) / d eps_k at eps = 0, checked against
    # torch's own SGD step on the eps-weighted loss with each eps_k moved by +-h.
    mlp.reset()
    batch = mlp.batches[0]
    problem = mlp.problem()
    exact = example_gradient(problem, batch, problem.rng_state())

    def val_after_step(eps: torch.Tensor) -> float:
        mlp.reset()
        loss = (eps * F.cross_entropy(mlp.student(batch.x), batch.y, reduction="none")).sum() / len(
            eps
        )
        mlp.optimizer.zero_grad()
        loss.backward()
        mlp.optimizer.step()
        with torch.no_grad():
            return float(F.cross_entropy(mlp.student(mlp.val.x), mlp.val.y))

    h = 1e-6
    numeric = torch.zeros(len(batch.y), dtype=torch.float64)
    for k in range(len(batch.y)):
        e = torch.zeros(len(batch.y), dtype=torch.float64)
        e[k] = h
        numeric[k] = (val_after_step(e) - val_after_step(-e)) / (2 * h)
    mlp.reset()
    assert (exact < 0).any() and (exact > 0).any()  # some samples help, some hurt
    assert relative_error(exact, numeric) < 1e-4


def test_update_meter_keeps_second_order_gradients_and_frees_the_graph():
    # sigmoid saves its output, the case where a saved tensor held with its
    # grad_fn leaked every retained graph (32 MB a step on LeNet).
    def second_derivative(x):
        y = torch.sigmoid(x)
        (dy,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return torch.autograd.grad(dy.sum(), x, retain_graph=True)[0], y

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    expected, _ = second_derivative(x)
    meter = UpdateMeter(torch.nn.Linear(1, 1))
    meter.start()
    got, y = second_derivative(x)
    metrics = meter.stop()
    assert torch.equal(got, expected)
    assert metrics["teacher/graph_mb"] > 0
    alive = weakref.ref(y)
    del y
    gc.collect()
    assert alive() is None


def test_an_in_place_change_to_a_saved_tensor_raises_under_the_update_meter() -> None:
    # Autograd skips its version check for tensors that pass through saved-tensor hooks;
    # the meter's hooks make it themselves, so a corrupted graph still raises.
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    meter = UpdateMeter(torch.nn.Linear(1, 1))
    meter.start()
    try:
        y = x.exp()  # exp saves its output for backward
        y.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation.*at version 1"):
            y.sum().backward()
        z = x.exp()  # untouched: the meter lets the gradient through
        (grad,) = torch.autograd.grad(z.sum(), x)
    finally:
        meter.stop()
    assert torch.equal(grad, x.exp())


def test_a_hypergradient_is_taken_without_stepping_anything(mlp: Setup) -> None:
    # The public call returns what a run hands the teacher's optimizer at the end of a span,
    # from plain (inputs, labels) pairs, and leaves the student, its momentum, the teacher,
    # the random state, the validation stream and the method where they were.
    expected = mlp.hypergradient(lambda p: Unrolled(p, 3, 2), 3)
    mlp.reset()
    problem = mlp.problem()
    method = Unrolled(problem, 3, 2)
    before, rng = mlp.state(), torch.get_rng_state()
    pairs = [(b.x, b.y) for b in mlp.batches[:3]]
    found = method.hypergradient(pairs, [context(t) for t in range(3)])
    assert list(found) == [k for k, _ in mlp.teacher.named_parameters()]
    assert torch.equal(torch.cat([g.reshape(-1) for g in found.values()]), expected)
    after = mlp.state()
    for part in before:
        for key, value in before[part].items():
            assert torch.equal(value, after[part][key]), (part, key)
    assert torch.equal(rng, torch.get_rng_state())
    assert problem.val_stream.position == 0 and method.position == 0
    assert method.pop_metrics() == {}
    with pytest.raises(ValueError, match="one hypergradient, at the last of the 4 batches"):
        method.hypergradient(pairs + pairs[:1])
    with pytest.raises(ValueError, match="contexts must give one entry per batch: 3, got 1"):
        method.hypergradient(pairs, [context(0)])
    method.step(mlp.batches[0], context(0))
    with pytest.raises(RuntimeError, match="inside a teacher span \\(1 steps in\\)"):
        method.hypergradient(pairs)


def test_val_batch_size_all_takes_the_whole_validation_split_in_chunks(make_config) -> None:
    """M(D_valid): the chunks' gradients add up to the gradient on the split as one batch
    (an MLP student, so BatchNorm's per-chunk statistics do not enter)."""
    trainer = Trainer(
        make_config(
            "teacher.name=deep_interaction",
            "teacher.hypergrad.val_batch_size=all",
            "train.eval_batch_size=64",
        )
    )
    problem = trainer.teaching.strategy.problem
    assert isinstance(problem.val_stream, WholeSplit)
    chunks = problem.val_stream.draw()
    n = len(trainer.data.val)
    assert [len(c.y) for c in chunks] == [64] * (n // 64) + ([n % 64] if n % 64 else [])
    whole = Batch(*(torch.cat(parts) for parts in zip(*chunks, strict=True)))
    assert torch.equal(whole.index.sort().values, torch.arange(n))
    params = {k: p.detach().requires_grad_() for k, p in problem.params().items()}
    chunked, chunked_loss = problem.val_gradient(params)
    direct, direct_loss = problem.val_gradient(params, whole)
    assert chunked_loss.item() == pytest.approx(direct_loss.item(), rel=1e-6)
    for k in params:
        assert torch.allclose(chunked[k], direct[k], rtol=1e-5, atol=1e-7), k
    assert problem.val_stream.position == 2
    with pytest.raises(
        ConfigError, match="teacher.hypergrad.val_batch_size .*an integer >= 1, or all"
    ):
        Trainer(
            make_config("teacher.name=deep_interaction", "teacher.hypergrad.val_batch_size=most")
        )
