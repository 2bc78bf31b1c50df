"""Co-teaching and SRIT: the R(T) schedule, small-loss selection, the exchange, SAM on the peer's selection."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metateach.data import Batch
from metateach.engine import BilevelProblem
from metateach.engine.peer import PeerTeaching
from metateach.errors import ConfigError
from metateach.evaluation import evaluate_models
from metateach.models import create_model
from metateach.optim import SAM, build_schedule
from metateach.teacher import TeachingContext
from metateach.teachers.co_teaching import (
    CoTeaching,
    estimate_noise_rate,
    keep_ratio,
    small_loss_mask,
)
from metateach.trainer import Trainer

from .conftest import CONFIGS, write_svhn

SHAPE = (1, 6, 6)


def test_keep_ratio_falls_linearly_to_one_minus_tau_over_tk_epochs_then_stays() -> None:
    tau, tk = 0.4, 10
    assert keep_ratio(0, tau, tk) == 1.0
    assert keep_ratio(5, tau, tk) == pytest.approx(1 - tau / 2)
    assert keep_ratio(10, tau, tk) == pytest.approx(1 - tau)
    assert keep_ratio(150, tau, tk) == pytest.approx(1 - tau)
    ratios = [keep_ratio(t, tau, tk) for t in range(12)]
    assert all(a > b for a, b in zip(ratios[:10], ratios[1:11], strict=True))
    assert keep_ratio(0, tau, 0) == pytest.approx(1 - tau)  # no ramp


def test_small_loss_selection_keeps_the_floor_of_r_n_smallest_losses() -> None:
    losses = torch.randn(50, generator=torch.Generator().manual_seed(0)).exp()
    for ratio in (1.0, 0.8, 0.6, 0.33, 0.0):
        mask = small_loss_mask(losses, ratio)
        keep = max(1, int(ratio * 50 + 1e-9))
        assert int(mask.sum()) == keep
        assert set(torch.argsort(losses)[:keep].tolist()) == set(mask.nonzero().flatten().tolist())
        if keep < 50:  # everything kept is below everything left out
            assert losses[mask].max() < losses[~mask].min()


def test_the_noise_rate_estimate_finds_the_high_loss_mode() -> None:
    g = torch.Generator().manual_seed(0)
    for rate in (0.2, 0.4):
        n = 20000
        noisy = torch.rand(n, generator=g) < rate
        # Clean samples are fitted (small loss), mislabeled ones are not yet.
        losses = torch.where(
            noisy,
            2.5 + 0.6 * torch.randn(n, generator=g),
            0.1 * torch.rand(n, generator=g).square(),
        ).clamp(min=0)
        assert estimate_noise_rate(losses) == pytest.approx(float(noisy.float().mean()), abs=0.02)
    assert estimate_noise_rate(torch.ones(10)) == 0.0


def make_problems(
    rho: float = 0.0,
) -> tuple[PeerTeaching, CoTeaching, torch.nn.Module, torch.nn.Module]:
    """A co-teaching strategy on two small MLPs with SGD (SAM around it if rho > 0)."""
    torch.manual_seed(0)

    def new() -> torch.nn.Module:
        return create_model("mlp", 4, SHAPE, {"hidden": [16]})

    student = new()
    teacher = CoTeaching(new, noise_rate=0.5, train_size=32, gradual_epochs=0)

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        return SAM(base, rho) if rho > 0 else base

    problem = BilevelProblem(
        student,
        optimizer(student),
        teacher,
        optimizer(teacher.peer),
        None,
        torch.zeros(32, dtype=torch.long),
    )
    return PeerTeaching(problem), teacher, student, teacher.peer


def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(
        torch.randn(32, *SHAPE, generator=g),
        torch.randint(0, 4, (32,), generator=g),
        torch.arange(32),
    )


CONTEXT = TeachingContext(0, 3, 100, torch.tensor(1.0), 0.0)


@pytest.mark.parametrize("rho", [0.0, 0.05], ids=["co-teaching", "srit"])
def test_each_network_steps_on_the_samples_its_peer_selected(rho: float) -> None:
    strategy, teacher, f, g = make_problems(rho)
    data = batch()
    f0, g0 = copy.deepcopy(f), copy.deepcopy(g)
    with torch.no_grad():
        own_f = small_loss_mask(F.cross_entropy(f0(data.x), data.y, reduction="none"), 0.5)
        own_g = small_loss_mask(F.cross_entropy(g0(data.x), data.y, reduction="none"), 0.5)
    assert (own_f != own_g).any()  # the two selections differ, so a missing exchange would show

    strategy.step(data, CONTEXT)

    for learner, before, chooser in ((f, f0, g0), (g, g0, f0)):
        expected = exchange_reference(before, chooser, data, rho)
        for p, q in zip(learner.parameters(), expected.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        # Stepping on its own selection instead would have gone elsewhere.
        wrong = exchange_reference(before, before, data, rho)
        assert any(
            not torch.allclose(p, q)
            for p, q in zip(learner.parameters(), wrong.parameters(), strict=True)
        )
    metrics = strategy.pop_metrics()
    assert metrics["peer/keep_ratio"] == 0.5


def exchange_reference(
    model: torch.nn.Module, chooser: torch.nn.Module, data: Batch, rho: float
) -> torch.nn.Module:
    """``model`` after one SGD step (lr 0.1), or SAM step, on the half of the batch ``chooser`` finds easiest."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        losses = F.cross_entropy(chooser(data.x), data.y, reduction="none")
    keep = torch.argsort(losses)[: len(losses) // 2]
    params = list(model.parameters())

    def gradient() -> list[torch.Tensor]:
        return list(torch.autograd.grad(F.cross_entropy(model(data.x[keep]), data.y[keep]), params))

    grads = gradient()
    if rho > 0:  # epsilon = rho g / ||g|| on the chooser's samples, the gradient there, back to w
        origin = [p.detach().clone() for p in params]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(rho * g / norm)
        grads = gradient()
        with torch.no_grad():
            for p, w in zip(params, origin, strict=True):
                p.copy_(w)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(0.1 * g)
    return model


def test_the_perturbation_of_srit_has_norm_rho_on_the_peer_selection() -> None:
    strategy, *_ = make_problems(rho=0.05)
    norms: list[float] = []
    for side in (strategy.problem, strategy.peer):
        original = side.optimizer.perturb

        def spy(grads: list[torch.Tensor], original=original) -> list[torch.Tensor]:
            epsilon = original(grads)
            norms.append(float(torch.sqrt(sum(e.double().square().sum() for e in epsilon))))
            return epsilon

        side.optimizer.perturb = spy  # type: ignore[method-assign]
    strategy.step(batch(), CONTEXT)
    assert norms == [pytest.approx(0.05, rel=1e-6)] * 2


def test_the_peer_follows_the_students_learning_rate() -> None:
    strategy, *_ = make_problems()
    for group in strategy.problem.optimizer.param_groups:
        group["lr"] = 0.0123
    strategy.step(batch(), CONTEXT)
    assert [grp["lr"] for grp in strategy.peer.optimizer.param_groups] == [0.0123]


def test_a_frozen_peer_selects_without_moving_its_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    teacher = CoTeaching(
        lambda: create_model("resnet8", 4, (3, 8, 8)), noise_rate=0.25, train_size=16
    )
    before = {k: b.clone() for k, b in teacher.peer.named_buffers()}
    data = Batch(torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)), torch.arange(16))
    view = type("View", (), {"context": TeachingContext(0, 20, 100, torch.tensor(1.0), 0.0)})()
    lesson = teacher(data, view)
    assert lesson.mask is not None and int(lesson.mask.sum()) == 12
    for k, b in teacher.peer.named_buffers():
        assert torch.equal(b, before[k]), k


def test_the_ensemble_averages_the_networks_probabilities() -> None:
    torch.manual_seed(0)
    a, b = (create_model("mlp", 3, (1, 2, 2), {"hidden": [4]}) for _ in range(2))
    x, y = torch.randn(40, 1, 2, 2), torch.randint(0, 3, (40,))
    loader = type(
        "Loader",
        (),
        {"__iter__": lambda self: iter([Batch(x, y, torch.arange(40))]), "split": y,
         "shard": (0, 1)},
    )()  # fmt: skip
    results = evaluate_models([a, b], loader, ensemble=True)
    with torch.no_grad():
        probs = (a(x).softmax(1) + b(x).softmax(1)) / 2
    assert results[2][1] == pytest.approx(float((probs.argmax(1) == y).float().mean()))
    assert results[0][1] == pytest.approx(float((a(x).argmax(1) == y).float().mean()))
    assert results[2][0] == pytest.approx(float(F.nll_loss(probs.log(), y)), rel=1e-5)


def test_the_linear_schedule_holds_then_decays_to_the_floor() -> None:
    schedule = build_schedule("linear", 200, milestones=[80])
    assert schedule(0) == schedule(80) == 1.0
    assert schedule(140) == pytest.approx(0.5)
    assert schedule(200) == pytest.approx(0.0)
    assert build_schedule("linear", 10, min_factor=0.1)(10) == pytest.approx(0.1)


NOISY = ["noise.type=symmetric", "noise.rate=0.4", "teacher.name=co_teaching", "train.epochs=3"]


def test_a_co_teaching_run_selects_cleaner_samples_and_logs_both_networks(make_config) -> None:
    cfg = make_config(*NOISY, "teacher.kwargs.gradual_epochs=1", "logging.plots=true")
    trainer = Trainer(cfg)
    trainer.fit()
    last = trainer.state.history[-1]
    # curves.png gains a third panel, the selections' label precision: 16 x 4 inches, not 11 x 4.
    with Image.open(trainer.run_dir / "curves.png") as curves:
        assert curves.width / curves.height == pytest.approx(4.0, rel=0.02)
    for key in ("peer/test_acc", "ensemble/test_acc", "peer/val_acc", "ensemble/val_acc"):
        assert 0.3 < last[key] <= 1.0, key
    # The small-loss samples are cleaner than the batch (60% clean).
    assert last["peer/label_precision_student"] > 0.75
    assert last["peer/label_precision_peer"] > 0.75
    assert last["peer/keep_ratio"] == pytest.approx(0.6, abs=0.01)
    # Both networks learn: the peer is as good as the student, give or take.
    assert abs(last["peer/test_acc"] - last["test/acc"]) < 0.1


def test_the_forget_rate_can_be_estimated_without_the_noise_rate(make_config) -> None:
    cfg = make_config(
        *NOISY,
        "teacher.kwargs.forget_rate=auto",
        "teacher.kwargs.gradual_epochs=1",
        "train.epochs=4",
    )
    trainer = Trainer(cfg)
    trainer.fit()
    history = trainer.state.history
    assert history[0]["peer/keep_ratio"] == 1.0  # the ramp starts at keeping all
    # The mixture on the losses finds about the 40% that were mislabeled.
    assert float(trainer.teaching.teacher.forget_rate) == pytest.approx(0.4, abs=0.12)
    assert history[-1]["peer/keep_ratio"] == pytest.approx(
        1 - float(trainer.teaching.teacher.forget_rate), abs=0.02
    )


@pytest.mark.parametrize(
    "extra",
    [[], ["optim.sam.rho=0.05", "teacher.kwargs.forget_rate=auto"]],
    ids=["co-teaching", "srit-auto"],
)
def test_a_peer_run_resumed_mid_epoch_ends_as_an_uninterrupted_one(
    make_config, tmp_path, extra
) -> None:
    whole = Trainer(make_config(*NOISY, *extra, "train.run_name=whole"))
    whole.fit()
    part = Trainer(make_config(*NOISY, *extra, "train.run_name=part"))
    part.fit(max_steps=int(1.5 * len(part.train_loader)))
    resumed = Trainer(
        make_config(*NOISY, *extra, "train.run_name=part", f"train.resume={part.run_dir}")
    )
    resumed.fit()
    for key in ("test/acc", "peer/test_acc", "ensemble/test_acc", "peer/label_precision_peer"):
        assert resumed.state.history[-1][key] == whole.state.history[-1][key], key
    for p, q in zip(
        resumed.teaching.teacher.parameters(), whole.teaching.teacher.parameters(), strict=True
    ):
        assert torch.equal(p, q)
    summary = json.loads((resumed.run_dir / "summary.json").read_text())
    assert summary["test/acc"] == whole.state.history[-1]["test/acc"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher.kwargs.forget_rate=1.5", "forget_rate must be in"),
        ("teacher.kwargs.forget_rate=most", "forget_rate must be in"),
        ("teacher.kwargs.gradual_epochs=-1", "gradual_epochs must be"),
        (
            "teacher.kwargs.tau=0.2",
            r"unknown option 'tau' for teacher 'co_teaching' \(teacher.kwargs\); "
            "valid: forget_rate, gradual_epochs$",
        ),
    ],
)
def test_bad_co_teaching_settings_name_the_key(make_config, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(make_config("teacher.name=co_teaching", override))


@pytest.mark.slow
def test_a_paper_cell_config_runs_where_the_data_is(
    make_config, tmp_path, skip_svhn_checksums: None
) -> None:
    # Small SVHN files made here: the cell's 9-layer CNN pair, instance-dependent noise and
    # SAM on the peer's selection run end to end.
    write_svhn(tmp_path, train=36, test=10)
    cfg = make_config(
        f"data.root={tmp_path}", "data.val_size=20", "train.epochs=1", "train.batch_size=8",
        "logging.diagnostics=false", path=CONFIGS / "srit" / "svhn_inst40.yaml",
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.cfg.model.name == "cnn9" and trainer.cfg.optim.sam.rho > 0
    assert isinstance(trainer.teaching.strategy, PeerTeaching)
    trainer.fit()
    assert trainer.state.step == 2
    assert {"peer/test_acc", "ensemble/test_acc", "peer/label_precision_peer"} <= set(
        trainer.state.history[-1]
    )
