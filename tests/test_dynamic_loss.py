"""L2T-DLN and L2T-DLF: the loss networks, the LSTM teacher's gradient, resuming mid-teaching."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn
from torch.func import functional_call

from metateach.checkpoint import LAST, load_checkpoint
from metateach.errors import ConfigError
from metateach.hypergrad.learned_optimizer import LearnedOptimizer
from metateach.optim.learned import CoordinatewiseLSTM, preprocess_gradients
from metateach.optim.rules import momentum_sgd_step
from metateach.report.diagnostics import CURVE_KEYS, P_TRUE
from metateach.teachers import DynamicLossNetwork, DynamicLossTeacher
from metateach.teachers.dynamic_loss import fit_to_cross_entropy, pairwise_encoding
from metateach.teachers.dynamic_loss_function import (
    DynamicLossFunctionTeacher,
    gated_cross_entropy,
)
from metateach.trainer import Trainer

from .conftest import CONFIGS, REPO, write_cifar100
from .hypergrad_fixtures import CLASSES, Setup, context
from .test_hypergrad import relative_error


def test_the_pairwise_encoding_pairs_the_true_class_with_each_wrong_one() -> None:
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    rows = pairwise_encoding(probs, torch.tensor([1, 2]))
    assert rows.shape == (2, 2, 4)
    assert torch.equal(rows[0], torch.tensor([[0.6, 0.1, 1, 0], [0.6, 0.3, 1, 0]]))
    assert torch.equal(rows[1], torch.tensor([[0.3, 0.5, 1, 0], [0.3, 0.2, 1, 0]]))


def test_the_network_starts_as_cross_entropy() -> None:
    network = DynamicLossNetwork("pairwise")
    fit_to_cross_entropy(network, 10, steps=400)
    p = torch.tensor([0.05, 0.1, 0.3, 0.5, 0.7, 0.9])
    logits = torch.cat([p[:, None], ((1 - p) / 9)[:, None].expand(-1, 9)], dim=1).log()
    with torch.no_grad():
        loss = network(logits, torch.zeros(6, dtype=torch.long))
    assert (loss - (-p.log())).abs().max() < 0.3
    assert (loss.diff() < 0).all()  # a higher true-class probability costs less
    assert all(p.grad is None for p in network.parameters())  # nothing stale for a next optimizer


def test_the_classwise_encoding_sums_a_score_per_class() -> None:
    network = DynamicLossNetwork("classwise", hidden=5, depth=1)
    logits, targets = torch.randn(3, 4), torch.tensor([0, 3, 1])
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(targets, 4).float()
    scores = network.mlp(torch.stack([probs, onehot], dim=2)).squeeze(2)
    assert torch.allclose(network(logits, targets), scores.sum(dim=1))


def test_gradient_preprocessing_follows_andrychowicz() -> None:
    p = 10.0
    grad = torch.tensor([1.0, -math.exp(-5), 1e-6, 0.0], dtype=torch.float64)
    expected = torch.tensor(
        [[0.0, 1.0], [-0.5, -1.0], [-1.0, math.exp(p) * 1e-6], [-1.0, 0.0]], dtype=torch.float64
    )
    assert torch.allclose(preprocess_gradients(grad, p), expected)


def test_the_lstm_proposes_nothing_until_it_has_learned() -> None:
    lstm = CoordinatewiseLSTM(hidden=5, layers=2)
    memory = lstm.initial_memory(7)
    update, memory = lstm(torch.randn(7), memory)
    assert memory.shape == (2, 2, 7, 5) and memory.abs().sum() > 0
    assert torch.equal(update, torch.zeros(7))


def test_l2t_dlf_starts_as_cross_entropy_and_its_gate_moves_the_loss() -> None:
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    zero_w, zero_b = torch.zeros(4, 4), torch.zeros(())
    ce = F.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(gated_cross_entropy(logits, targets, zero_w, zero_b), ce)
    assert (gated_cross_entropy(logits, targets, zero_w, torch.tensor(-2.0)) < ce).all()
    teacher = DynamicLossFunctionTeacher(4)
    w, b = teacher.coefficients(context())
    assert w.shape == (4, 4) and not w.any() and b == 0


# --------------------------------------------------------------------------- #
# The LSTM teacher's gradient
# --------------------------------------------------------------------------- #


def small_dln_teacher(student: nn.Module) -> DynamicLossTeacher:
    _ = student
    teacher = DynamicLossTeacher(
        CLASSES, hidden=4, depth=2, init_steps=30, lstm_hidden=3, lstm_layers=2
    )
    g = torch.Generator().manual_seed(5)
    teacher.memory = 0.3 * torch.randn(teacher.memory.shape, generator=g)  # experience so far
    return teacher


@pytest.fixture(scope="module")
def dln() -> Setup:
    return Setup("mlp", teacher=small_dln_teacher)


def psi_shift(setup: Setup, direction: torch.Tensor) -> torch.Tensor:
    """A shift of the teacher's flat parameters that moves its trainable (LSTM) ones by ``direction``."""
    trainable = torch.cat(
        [torch.full((p.numel(),), p.requires_grad) for p in setup.teacher.parameters()]
    )
    shift = torch.zeros(len(trainable), dtype=torch.float64)
    shift[trainable] = direction
    return shift


def test_the_lstm_teachers_gradient_matches_finite_differences(dln: Setup) -> None:
    # Two rounds of K = B = 3 steps, a truncation after every round: round 1
    # runs under the given network, the LSTM then updates it from round 1's
    # gradient, and round 2's validation loss depends on the LSTM's
    # parameters through that update only. Nothing is truncated away, so
    # the gradient is exactly the derivative of that loss: checked along
    # the gradient itself and along random directions (central differences).
    def method(problem):
        return LearnedOptimizer(problem, 3, 3, rounds=1)

    exact = dln.hypergradient(method, 6)

    def val_loss_after_two_rounds(direction: torch.Tensor) -> float:
        dln.reset(psi_shift(dln, direction))
        strategy = method(dln.problem())
        for t in range(6):
            strategy.step(dln.batches[t], context(t))
        with torch.no_grad():
            return float(F.cross_entropy(dln.student(dln.val.x), dln.val.y))

    g = torch.Generator().manual_seed(1)
    directions = [exact / exact.norm()] + [
        torch.randn(len(exact), generator=g, dtype=torch.float64) for _ in range(4)
    ]
    h = 1e-6
    for u in directions:
        numeric = (val_loss_after_two_rounds(h * u) - val_loss_after_two_rounds(-h * u)) / (2 * h)
        analytic = float(exact @ u)
        assert abs(analytic - numeric) < 1e-4 * abs(analytic) + 1e-10, (analytic, numeric)
    dln.reset()
    assert exact.norm() > 1e-6


def reference_psi_gradient(setup: Setup, k: int, rounds: int) -> torch.Tensor:
    """Truncated BPTT through ``rounds`` rounds written as one graph, with plain autograd.

    Each round starts from the student's state as a constant; the LSTM's
    gradient input is a constant; the LSTM's memory and the network's
    weights keep their graph across rounds. The loss is the sum of the
    validation losses of the rounds that follow an LSTM update.
    """
    setup.reset()
    teacher, problem = setup.teacher, setup.problem()
    lr, mu, wd = setup.settings
    phi = {k_: v.clone().requires_grad_() for k_, v in teacher.lesson_weights().items()}
    memory = teacher.memory.detach()
    params = {k_: p.detach() for k_, p in problem.params().items()}
    momentum = dict(zip(params, problem.inner_state(), strict=True))
    total, pending, t = torch.zeros((), dtype=torch.float64), None, 0
    for r in range(rounds):
        if pending is not None:
            update, memory = teacher.lstm(torch.cat([g.reshape(-1) for g in pending]), memory)
            pieces = update.split([v.numel() for v in phi.values()])
            phi = {k_: v + u.view(v.shape) for (k_, v), u in zip(phi.items(), pieces, strict=True)}
        params = {k_: v.detach().requires_grad_() for k_, v in params.items()}
        momentum = {k_: v.detach() for k_, v in momentum.items()}
        for _ in range(k):
            batch = setup.batches[t]
            t += 1
            logits = functional_call(setup.student, params, (batch.x,))
            loss = teacher.loss(phi, logits, batch.y).mean()
            grads = autograd.grad(loss, list(params.values()), create_graph=True)
            named = dict(zip(params, grads, strict=True))
            params, momentum = momentum_sgd_step(params, momentum, named, lr, mu, wd)
        val = F.cross_entropy(functional_call(setup.student, params, (setup.val.x,)), setup.val.y)
        if r > 0:
            total = total + val
        grads = autograd.grad(val, list(phi.values()), retain_graph=True, allow_unused=True)
        # (the output bias shifts the loss by a constant: it never reaches the student)
        pending = [
            torch.zeros_like(v) if g is None else g.detach()
            for v, g in zip(phi.values(), grads, strict=True)
        ]
    grads = autograd.grad(total, problem.teacher_params())
    setup.reset()
    return torch.cat([g.reshape(-1) for g in grads])


def test_backpropagation_through_rounds_matches_one_graph_through_them_all(dln: Setup) -> None:
    # Three rounds in one window: the LSTM's updates after rounds 1 and 2
    # reach the losses of rounds 2 and 3, through its memory as well.
    engine = dln.hypergradient(lambda p: LearnedOptimizer(p, 2, 2, rounds=3), 6)
    reference = reference_psi_gradient(dln, 2, 3)
    assert engine.norm() > 1e-6
    assert relative_error(engine, reference) < 1e-9


def test_a_hypergradient_over_two_rounds_leaves_the_lesson_and_the_memory(dln: Setup) -> None:
    # learned_optimizer's hypergradient moves the lesson's weights and the LSTM's memory on its
    # way; afterwards the teacher teaches with what it had, and a run goes as it would have.
    def method(problem):
        return LearnedOptimizer(problem, 3, 3, rounds=1)

    expected = dln.hypergradient(method, 6)
    dln.reset()
    teacher = dln.teacher
    phi = {k: v.clone() for k, v in teacher.lesson_weights().items()}
    memory = teacher.memory.clone()
    found = method(dln.problem()).hypergradient(dln.batches[:6], [context(t) for t in range(6)])
    assert torch.equal(torch.cat([g.reshape(-1) for g in found.values()]), expected)
    assert all(torch.equal(phi[k], v) for k, v in teacher.lesson_weights_in_use().items())
    assert torch.equal(teacher.memory, memory)
    assert torch.equal(dln.hypergradient(method, 6), expected)


def test_l2t_dln_and_the_learned_optimizer_method_go_together(make_config) -> None:
    with pytest.raises(ConfigError, match="it needs teacher.hypergrad.method=learned_optimizer"):
        Trainer(
            make_config(
                "teacher.name=l2t_dln",
                "teacher.kwargs.init_steps=0",
                "teacher.hypergrad.method=unrolled",
            )
        )
    with pytest.raises(ConfigError, match="learned_optimizer method needs a teacher whose lesson"):
        Trainer(
            make_config(
                "teacher.name=meta_weight_net", "teacher.hypergrad.method=learned_optimizer"
            )
        )


# --------------------------------------------------------------------------- #
# Runs
# --------------------------------------------------------------------------- #

SMALL_DLN = (
    "teacher.name=l2t_dln",
    "teacher.kwargs={hidden: 8, depth: 2, init_steps: 100, lstm_hidden: 6}",
    "teacher.hypergrad.inner_steps=4",
    "teacher.hypergrad.backprop_steps=2",
    "teacher.hypergrad.options.rounds=3",
    "teacher.optim.lr=0.01",
)


def test_a_resumed_l2t_dln_run_ends_exactly_like_an_uninterrupted_one(make_config) -> None:
    common = (*SMALL_DLN, "train.epochs=2", "logging.diagnostic_samples=200")
    straight = Trainer(make_config(*common, "train.run_name=straight", "logging.plots=true"))
    expected = straight.fit()

    first = Trainer(make_config(*common, "train.run_name=cut"))
    first.fit(max_steps=14)  # mid-window: the checkpoint waits for the window of 3 rounds to end
    assert first.state.step == 24 and first.state.epoch == 1

    resumed = Trainer(make_config(*common, f"train.resume={first.run_dir}"))
    final = resumed.fit()
    assert final["test/acc"] == expected["test/acc"] and final["test/acc"] > 0.6
    teacher, reference = resumed.teaching.teacher, straight.teaching.teacher
    assert teacher.memory.abs().sum() > 0  # the LSTM has run, and its memory came back
    for (name, a), b in zip(
        teacher.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert str(resumed.teaching.optimizer.state_dict()) == str(
        straight.teaching.optimizer.state_dict()
    )
    # The network moved away from its starting point, and each epoch recorded its curve.
    start = DynamicLossTeacher(10, hidden=8, depth=2, init_steps=100, lstm_hidden=6)
    assert not torch.equal(start.dln.mlp[0].weight, teacher.dln.mlp[0].weight)
    assert all(key in final for key in CURVE_KEYS) and len(CURVE_KEYS) == len(P_TRUE)
    assert (straight.run_dir / "diagnostics" / "loss_curve.png").stat().st_size > 10_000
    # The run ended inside a window (10 rounds, windows of 3): the final checkpoint still holds
    # the final network, LSTM and memory.
    saved = load_checkpoint(resumed.run_dir / "checkpoints" / LAST)["teacher"]
    for name, value in teacher.state_dict().items():
        assert torch.equal(saved[name], value), name


def test_l2t_dlf_trains_a_student(make_config) -> None:
    trainer = Trainer(
        make_config(
            "teacher.name=l2t_dlf",
            "teacher.hypergrad.inner_steps=4",
            "teacher.hypergrad.backprop_steps=2",
            "teacher.optim.lr=0.01",
        )
    )
    assert trainer.fit()["test/acc"] > 0.6
    w, b = trainer.teaching.teacher.coefficients(trainer.context())
    assert w.abs().sum() + b.abs() > 0  # it learned coefficients other than cross-entropy's


def test_the_cifar100_config_without_the_data_stops_with_one_line(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), str(CONFIGS / "l2t_dln" / "cifar100_resnet32.yaml"),
         f"data.root={tmp_path}", "logging.wandb=disabled", f"train.out_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: CIFAR100 not found under data root '{tmp_path}'")
    assert "data.download=true" in run.stderr


@pytest.mark.slow
def test_the_cifar100_config_runs_where_the_data_is(
    make_config, tmp_path, skip_cifar_checksums: None
) -> None:
    # Small CIFAR-100 files made here: the config's student (ResNet-32), its 100-class
    # network and its LSTM teacher run end to end, through one LSTM update.
    write_cifar100(tmp_path, train=400, test=100)
    cfg = make_config(
        f"data.root={tmp_path}", "data.val_size=100", "train.epochs=1", "train.batch_size=50",
        "teacher.kwargs.init_steps=50", "teacher.hypergrad.inner_steps=3",
        "teacher.hypergrad.backprop_steps=3", "teacher.hypergrad.options.rounds=1",
        "logging.diagnostics=false", path=CONFIGS / "l2t_dln" / "cifar100_resnet32.yaml",
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.cfg.model.name == "resnet32" and trainer.data.num_classes == 100
    updates = []
    original = trainer.teaching.strategy.update_teacher
    trainer.teaching.strategy.update_teacher = lambda g: (updates.append(g), original(g))
    trainer.fit()
    assert trainer.state.step == 6 and len(updates) == 1
