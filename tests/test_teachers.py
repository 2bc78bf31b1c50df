"""The data-weighting teachers: what each one gives a batch, and that each runs in the trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metateach.data import Batch
from metateach.engine import StudentOnly
from metateach.errors import ConfigError
from metateach.hypergrad import ExampleGradients
from metateach.hypergrad.reversible import Reversible
from metateach.lesson import lesson_loss, per_sample_losses
from metateach.models import create_model
from metateach.student import StudentStates
from metateach.teacher import StudentView, TeachingContext
from metateach.teachers import (
    DeepInteractionTeacher,
    FocalLoss,
    LabelSmoothing,
    LargeMarginSoftmax,
    LearningToReweight,
    MentorNetPD,
    MetaWeightNet,
    RandomFilter,
    SelfPacedLearning,
)
from metateach.teachers.focal import focal_loss
from metateach.teachers.label_smoothing import label_smoothing_loss
from metateach.teachers.large_margin import large_margin_loss, margin_psi
from metateach.teachers.mentornet import (
    MentorNetDD,
    MentorNetwork,
    fit_mentornet,
    load_record,
    predefined_curriculum,
)
from metateach.teachers.robust_loss import (
    AdaptiveRobustLoss,
    adaptive_nll,
    log_partition,
    robust_rho,
    shape_of,
)
from metateach.trainer import Trainer

from .conftest import CONFIGS, sample_record


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


def test_meta_weight_net_weights_are_a_function_of_the_loss_as_given_or_normalized() -> None:
    torch.manual_seed(0)
    teacher = MetaWeightNet(hidden=100)
    assert [tuple(p.shape) for p in teacher.parameters()] == [(100, 1), (100,), (1, 100), (1,)]
    batch, logits = batch_of(12)
    view = view_of(logits, batch.y)
    raw = teacher.net(view.losses.unsqueeze(1)).squeeze(1)
    # The authors' stable code (MW-Net.py): the batch mean of w_i * loss_i.
    lesson = teacher(batch, view)
    assert torch.equal(lesson.weights, raw)
    assert lesson_loss(lesson, logits, batch.y).item() == pytest.approx(
        (raw * view.losses).mean().item()
    )
    same_loss = view._replace(losses=torch.full((12,), 0.3))
    assert torch.allclose(teacher(batch, same_loss).weights, teacher(batch, same_loss).weights[0])
    # Their first release: the weights scaled to sum to the batch.
    teacher.normalize = True
    assert teacher(batch, view).weights.sum().item() == pytest.approx(12.0)
    assert torch.allclose(teacher(batch, same_loss).weights, torch.ones(12))


def test_mentornet_dd_fits_its_network_to_tell_right_labels_from_wrong(tmp_path) -> None:
    record, _ = sample_record(tmp_path / "samples.npz")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    network, report = fit_mentornet(record, steps=400)
    assert torch.equal(torch.get_rng_state(), before)  # the run's random state is left alone
    assert report["examples"] == 2000 and report["clean_share"] == pytest.approx(
        float((record.targets == record.clean_targets).mean())
    )
    assert report["held_out_accuracy"] > 0.95 and report["held_out_bce"] < 0.3
    assert report["threshold"] == pytest.approx(
        float(torch.quantile(torch.tensor(record.losses).double(), 0.9))
    )
    again, _ = fit_mentornet(record, steps=400)  # seeded: the same network
    for a, b in zip(network.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert isinstance(network, MentorNetwork)
    assert "epoch_embedding" not in dict(network.named_parameters())  # fixed, as the authors'


def test_mentornet_dd_weighs_by_its_network_after_the_burn_in(tmp_path) -> None:
    _, path = sample_record(tmp_path / "samples.npz")
    teacher = MentorNetDD(str(path), fit={"steps": 300}, noise_rate=0.4, dropout=[[0.0, 1.0]])
    assert teacher.percentile == 0.6  # the authors' for 40% noise
    assert MentorNetDD(str(path), fit={"steps": 1}, noise_rate=0.2).percentile == 0.8
    batch, logits = batch_of(20)
    early = teacher(batch, view_of(logits, batch.y, progress=0.1))
    assert torch.equal(early.weights, torch.ones(20))  # the burn-in
    assert not teacher.fitted and teacher.metrics() == {}  # fitted when first needed
    view = view_of(logits, batch.y, progress=0.6)
    late = teacher(batch, view)
    _, report = fit_mentornet(load_record(str(path)), steps=300)
    assert teacher.metrics() == {f"mentor_fit/{k}": pytest.approx(v) for k, v in report.items()}
    epochs = torch.full((20,), 18)  # the epoch feature held at the burn-in's end
    expected = torch.sigmoid(
        teacher.network(view.losses, view.losses - teacher.threshold.float(), 0 * epochs, epochs)
    )
    assert torch.allclose(late.weights, expected)
    assert not any(p.requires_grad for p in teacher.parameters())
    # A checkpoint brings the fitted network: a resumed run does not fit again.
    resumed = MentorNetDD(str(path), fit={"steps": 300}, noise_rate=0.4, dropout=[[0.0, 1.0]])
    resumed.load_state_dict(teacher.state_dict())
    resumed.fit = None  # type: ignore[assignment]  # would fail if called
    assert resumed.fitted and torch.equal(
        resumed(batch, view).weights, teacher(batch, view).weights
    )


def test_mentornet_dd_logs_its_fit_and_a_resumed_run_does_not_refit(
    tmp_path, make_config, monkeypatch
) -> None:
    import metateach.teachers.mentornet as mentornet

    calls = []
    fit = mentornet.fit_mentornet
    monkeypatch.setattr(mentornet, "fit_mentornet", lambda *a, **k: calls.append(1) or fit(*a, **k))
    _, path = sample_record(tmp_path / "samples.npz")
    common = ("teacher.name=mentornet_dd", f"teacher.kwargs.record={path}",
              "teacher.kwargs.fit.steps=20", "teacher.kwargs.burn_in=0.1", "train.epochs=3")  # fmt: skip
    cut = Trainer(make_config(*common, "train.run_name=dd"))
    cut.fit(max_steps=2 * len(cut.train_loader) + 1)  # two epochs, then a checkpoint
    first = [m for m in cut.state.history if "teacher/mentor_fit/held_out_accuracy" in m]
    assert len(first) == 2 and calls == [1]  # fitted after the burn-in, in epoch 1
    resumed = Trainer(make_config(*common, f"train.resume={cut.run_dir}"))
    resumed.fit()
    assert calls == [1]
    last = resumed.state.history[-1]
    assert last["teacher/mentor_fit/threshold"] == first[0]["teacher/mentor_fit/threshold"]


def test_mentornet_dd_names_a_missing_record_and_bad_settings(tmp_path, make_config) -> None:
    cfg = make_config("teacher.name=mentornet_dd", f"teacher.kwargs.record={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigError, match=r"teacher 'mentornet_dd'.*no sample record at .*nowhere"):
        Trainer(cfg)
    _, path = sample_record(tmp_path / "samples.npz")
    with pytest.raises(ValueError, match="fit has no setting 'rate'"):
        MentorNetDD(str(path), fit={"rate": 1})


def test_mentornet_pd_follows_its_predefined_curriculum() -> None:
    losses = torch.tensor([0.1, 0.5, 0.9, 1.4, 3.0])
    threshold = torch.tensor(0.8)
    assert torch.equal(predefined_curriculum(losses, threshold, 0.18), torch.ones(5))  # burn-in
    assert predefined_curriculum(losses, threshold, 0.5).tolist() == [1, 1, 0, 0, 0]  # self-paced
    linear = predefined_curriculum(losses, threshold, 0.95, gamma=1.0)
    assert linear.tolist() == pytest.approx([1, 1, 0.9, 0.4, 0])  # clip(1 - (l - lambda) / gamma)


def test_mentornet_pd_thresholds_at_a_running_percentile_and_drops_examples() -> None:
    teacher = MentorNetPD(percentile=0.5, decay=0.9, dropout=[[0.5, 0.2], [0.1, 0.8]])
    assert (teacher.dropout_rate(0.1), teacher.dropout_rate(0.5)) == (0.5, 0.1)
    batch, logits = batch_of(20)
    losses = F.cross_entropy(logits, batch.y, reduction="none")
    torch.manual_seed(0)
    early = teacher(batch, view_of(logits, batch.y, progress=0.1))
    median = torch.quantile(losses.double(), 0.5)
    assert teacher.threshold.item() == pytest.approx(0.1 * median.item())  # from 0, as theirs
    assert int((early.weights > 0).sum()) == 10  # burn-in ones, half dropped
    late = teacher(batch, view_of(logits, batch.y, progress=0.5))
    assert teacher.threshold.item() == pytest.approx(0.19 * median.item())
    kept = late.weights > 0
    assert int(kept.sum()) <= 18 and torch.all(losses[kept] <= teacher.threshold.float())
    assert "threshold" in teacher.state_dict()  # a resumed run picks it up
    for bad, message in (
        ({"percentile": 0}, "percentile must be in"),
        ({"dropout": [[0.5, 0.5]]}, "dropout must be .* adding up to 1"),
    ):
        with pytest.raises(ValueError, match=message):
            MentorNetPD(**bad)


def test_deep_interaction_inputs_follow_the_feature_choice() -> None:
    student = create_model("resnet8", 10, (3, 32, 32))
    states = student(torch.randn(5, 3, 32, 32), return_states=True)
    batch = Batch(torch.zeros(5), torch.tensor([0, 1, 2, 3, 9]), torch.arange(5))
    context = TeachingContext(30, 1, 120, torch.tensor(1.5), 0.4)
    losses = F.cross_entropy(states.logits, batch.y, reduction="none")
    view = StudentView(states.logits, losses, states.features, states.maps, context)
    widths = {"I0": 64, "I1": 64 * 8 * 8, "I2": 32 * 16 * 16, "I3": 16 * 32 * 32, "M0": 16}
    widths["M1"] = 14
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
    gridded = DeepInteractionTeacher(10, student, ["I1", "I3"], map_grid=2).inputs(batch, view)
    assert torch.allclose(
        gridded[:, : 64 * 4], F.adaptive_avg_pool2d(states.maps[-1], 2).flatten(1)
    )
    assert gridded.shape == (5, (64 + 16) * 2 * 2)
    assert (
        len(DeepInteractionTeacher(10, student, ["I0"], hidden_layers=2).net) == 5
    )  # (Linear, ReLU) x 2, Linear


@pytest.mark.parametrize(
    ("model", "levels"),
    [
        ("resnet32", {"I0": (64,), "I1": (64, 8, 8), "I2": (32, 16, 16), "I3": (16, 32, 32)}),
        ("resnet110", {"I0": (64,), "I1": (64, 8, 8), "I2": (32, 16, 16), "I3": (16, 32, 32)}),
        ("wrn28_10", {"I0": (640,), "I1": (640, 8, 8), "I2": (320, 16, 16), "I3": (160, 32, 32)}),
        ("lenet", {"I0": (500,), "I1": (50, 4, 4), "I2": (20, 12, 12)}),
    ],
)
def test_deep_interaction_levels_are_the_papers_distinct_maps(model: str, levels: dict) -> None:
    """I0..I3 as the teacher's docstring states them: distinct inputs of those sizes.

    The CIFAR students' I1 is the 8x8 maps themselves, not their average
    (which is I0); LeNet's fc layer is I0, so its I1 is conv2's maps.
    """
    shape = (1, 28, 28) if model == "lenet" else (3, 32, 32)
    torch.manual_seed(0)
    student = create_model(model, 10, shape).eval()
    with torch.no_grad():
        states = student(torch.randn(2, *shape), return_states=True)
    context = TeachingContext(0, 0, 10, torch.tensor(1.0), 0.0)
    view = StudentView(states.logits, states.logits[:, 0], states.features, states.maps, context)
    batch = Batch(torch.zeros(2), torch.tensor([1, 2]), torch.arange(2))
    inputs = {
        name: DeepInteractionTeacher(10, student, [name]).inputs(batch, view) for name in levels
    }
    for name, size in levels.items():
        assert inputs[name].shape == (2, math.prod(size)), name
    assert torch.equal(inputs["I1"], states.maps[student.levels[0]].flatten(1))
    names = list(levels)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if inputs[a].shape == inputs[b].shape:
                assert not torch.allclose(inputs[a], inputs[b]), (a, b)
    pooled_i1 = states.maps[student.levels[0]].flatten(2).mean(2)
    assert pooled_i1.shape[1] != inputs["I1"].shape[1]  # a map, not one number a channel
    if model == "lenet":
        with pytest.raises(ValueError, match=r"I3 is not available: LeNet has 2 stage\(s\) below"):
            DeepInteractionTeacher(10, student, ["I0", "I3"])


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


def test_label_smoothing_against_hand_computed_values() -> None:
    """Logits (2, 0, 0), label 0: log p = (2 - L, -L, -L) with L = log(e^2 + 2), so the loss is
    (1 - eps) (L - 2) + eps (L - 2/3) = L - 2 + 4 eps / 3."""
    logits, y = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    big_l = math.log(math.e**2 + 2)
    for eps in (0.0, 0.1, 0.3):
        found = label_smoothing_loss(logits, y, eps)
        assert found.item() == pytest.approx(big_l - 2 + 4 * eps / 3, abs=1e-12)
    batch, logits = batch_of(16)
    lesson = LabelSmoothing(epsilon=0.2)(batch, view_of(logits, batch.y))
    expected = F.cross_entropy(logits, batch.y, label_smoothing=0.2)  # PyTorch's, the same rule
    assert torch.allclose(lesson_loss(lesson, logits, batch.y), expected)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\)"):
        LabelSmoothing(epsilon=1.0)


def test_label_smoothing_trains_on_the_quickstart(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=label_smoothing", path=CONFIGS / "quickstart.yaml"))
    assert type(trainer.teaching.strategy) is StudentOnly
    assert trainer.fit()["test/acc"] > 0.85


def _head_states(x: list[list[float]], bias: list[float] | None = None) -> StudentStates:
    """A linear head W = I (two classes, two features) on features ``x``."""
    weight = torch.eye(2, dtype=torch.float64)
    features = torch.tensor(x, dtype=torch.float64)
    logits = features @ weight.T + (0 if bias is None else torch.tensor(bias, dtype=torch.float64))
    return StudentStates(logits, features, (), weight)


def test_large_margin_softmax_against_hand_computed_values() -> None:
    """m = 2, W = I, label 0. x = (1, 1): theta = 45 degrees, psi = cos 90 = 0, so the true
    class's logit is |W_0| |x| psi = 0 and the loss log(1 + e). x = (-1, 1): theta = 135 degrees,
    k = 1, psi = -cos 270 - 2 = -2, logit -2 sqrt 2. With lam = 1 the logit is the mean of
    W_0 x = -1 and -2 sqrt 2. A bias is added to the margin logit."""
    y = torch.tensor([0])
    r2 = math.sqrt(2)
    cases = [
        ([[1.0, 1.0]], 0.0, None, math.log(1 + math.e)),
        ([[-1.0, 1.0]], 0.0, None, math.log(1 + math.exp(1 + 2 * r2))),
        ([[-1.0, 1.0]], 1.0, None, math.log(1 + math.exp(1 - (-1 - 2 * r2) / 2))),
        ([[1.0, 1.0]], 0.0, [0.5, -0.25], math.log(1 + math.exp(0.75 - 0.5))),
    ]
    for x, lam, bias, expected in cases:
        found = large_margin_loss(_head_states(x, bias), y, margin=2, lam=lam)
        assert found.item() == pytest.approx(expected, abs=1e-12)
    # m = 1 is cross-entropy; psi is continuous and decreasing in theta for every m.
    states = _head_states([[0.3, -1.2], [2.0, 0.4], [-0.5, -0.7]])
    labels = torch.tensor([0, 1, 0])
    ce = F.cross_entropy(states.logits, labels, reduction="none")
    torch.testing.assert_close(large_margin_loss(states, labels, margin=1, lam=0.0), ce)
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    for m in (1, 2, 3, 4):
        psi = margin_psi(torch.cos(theta), m)
        assert (psi.diff() <= 1e-9).all() and psi.diff().abs().max() < 0.05
        assert psi[0].item() == pytest.approx(1.0) and psi[-1].item() == pytest.approx(1 - 2 * m)


def test_large_margin_softmax_needs_the_states_and_a_linear_head() -> None:
    states = _head_states([[1.0, 0.5]])
    y = torch.tensor([1])
    lesson = LargeMarginSoftmax(margin=3, base=0.0)(
        Batch(torch.zeros(1, 1), y, torch.arange(1)), view_of(states.logits, y)
    )
    assert lesson_loss(lesson, states, y).item() > F.cross_entropy(states.logits, y).item()
    with pytest.raises(TypeError, match="reads the student's states, and this route passed its"):
        per_sample_losses(lesson, states.logits, y)
    with pytest.raises(ValueError, match="needs a student whose head is a linear map"):
        large_margin_loss(states._replace(head_weight=None), y, margin=2, lam=0.0)
    teacher = LargeMarginSoftmax()
    assert teacher.annealing(0) == pytest.approx(1000 * (1 + 2.5e-5) ** -35)
    assert teacher.annealing(15_580) < 0.01 < teacher.annealing(15_500)
    with pytest.raises(ValueError, match="margin must be an integer >= 1"):
        LargeMarginSoftmax(margin=0)


def test_large_margin_softmax_trains_on_the_quickstart(make_config) -> None:
    # Annealed into L-Softmax within the quickstart's 600 steps (lam 0.29 at the end); from
    # the first step (base 0), m = 2 and m = 4 collapse this MLP to chance, as the authors warn.
    trainer = Trainer(
        make_config(
            "teacher.name=large_margin_softmax",
            "teacher.kwargs={margin: 2, base: 100.0, gamma: 0.01, power: 3.0}",
            path=CONFIGS / "quickstart.yaml",
        )
    )
    assert trainer.fit()["test/acc"] > 0.85
    assert trainer.teaching.teacher.annealing(trainer.state.step) < 0.3


def test_the_robust_loss_against_hand_computed_values() -> None:
    """rho at alpha = 1 is Charbonnier's sqrt((x/c)^2 + 1) - 1; at alpha = 0.5,
    3 ((x/c)^2 / 1.5 + 1)^(1/4) - 3. Z(1) = 2 e K_1(1) in closed form, and log Z elsewhere is
    adaptive quadrature's (scipy). Logits (0, 0), label 0, alpha = c = 1: residuals -1/2 and
    1/2, so the sample's loss is 2 (sqrt(5/4) - 1) + 2 log Z(1)."""
    from scipy import integrate, special

    one = torch.ones((), dtype=torch.float64)
    x = torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64)
    expected = [math.sqrt((v / 2) ** 2 + 1) - 1 for v in x.tolist()]
    torch.testing.assert_close(robust_rho(x, one, 2 * one), torch.tensor(expected).double())
    expected = [3 * ((v**2) / 1.5 + 1) ** 0.25 - 3 for v in x.tolist()]
    torch.testing.assert_close(robust_rho(x, 0.5 * one, one), torch.tensor(expected).double())

    def latent_of(alpha: float) -> torch.Tensor:
        share = (alpha - 0.001) / 1.998
        return torch.tensor(math.log(share / (1 - share)), dtype=torch.float64)

    log_z1 = math.log(2 * math.e * special.k1(1.0))
    assert log_partition(latent_of(1.0)).item() == pytest.approx(log_z1, abs=1e-6)
    for alpha in (0.0013, 0.3, 1.7, 1.98, 1.9989):
        assert shape_of(latent_of(alpha)).item() == pytest.approx(alpha)

        def density(v: float, a: float = alpha) -> float:  # exp(-rho(v, a, 1)), Eq. 1
            b = abs(a - 2)
            return math.exp(-b / a * ((v * v / b + 1) ** (a / 2) - 1))

        half, _ = integrate.quad(density, 0, math.inf, limit=500, epsabs=1e-13, epsrel=1e-12)
        assert log_partition(latent_of(alpha)).item() == pytest.approx(math.log(2 * half), abs=1e-6)
    # The spline's slope is log Z's: against central differences of the table's own values.
    latent = torch.tensor([-3.0, 0.4, 5.0], dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(log_partition(latent).sum(), latent)
    h = 1e-4
    numeric = (log_partition(latent.detach() + h) - log_partition(latent.detach() - h)) / (2 * h)
    torch.testing.assert_close(slope, numeric, rtol=1e-6, atol=1e-9)
    latent_alpha = torch.zeros(2, dtype=torch.float64)  # alpha = 1
    latent_scale = torch.full((2,), math.log(math.expm1(1 - 1e-5)), dtype=torch.float64)  # c = 1
    logits = torch.zeros(1, 2, dtype=torch.float64)
    found = adaptive_nll(logits, torch.tensor([0]), latent_alpha, latent_scale)
    assert found.item() == pytest.approx(2 * (math.sqrt(1.25) - 1) + 2 * log_z1, abs=1e-6)
    with pytest.raises(ValueError, match=r"alpha_init must be in \(0.001, 1.999\)"):
        AdaptiveRobustLoss(3, alpha_init=2.0)


def test_the_robust_loss_learns_its_shape_with_the_student(make_config) -> None:
    """Each step the shape and scale take the teacher optimizer's step on the training loss's
    gradient, taken before the student's step; on the quickstart both move and the student learns.

    At a tenth of the quickstart's learning rate: at 0.05 the scales shrink to their floor, the
    loss's gradients grow as 1/c^alpha, and the student diverges to chance by epoch 7."""
    trainer = Trainer(
        make_config(
            "teacher.name=adaptive_robust_loss", "optim.lr=0.005", path=CONFIGS / "quickstart.yaml"
        )
    )
    teacher = trainer.teaching.teacher
    assert type(trainer.teaching.strategy).__name__ == "WithStudentSteps"
    batch = next(iter(trainer.train_loader.epoch(0)))
    before = [p.detach().clone() for p in teacher.parameters()]
    lesson = teacher(
        batch,
        trainer.teaching.strategy.problem.view(
            trainer.model(batch.x, return_states=True), batch, trainer.context()
        ),
    )
    loss = lesson_loss(lesson, trainer.model(batch.x), batch.y)
    grads = torch.autograd.grad(loss, list(teacher.parameters()))
    lr = trainer.teaching.strategy.problem.optimizer.param_groups[0]["lr"]
    trainer.teaching.strategy.step(batch, trainer.context())
    for p, b, g in zip(teacher.parameters(), before, grads, strict=True):
        # SGD with momentum 0.9 and weight decay 5e-4, first step: p - lr (g + wd p).
        torch.testing.assert_close(p.detach(), b - lr * (g + 5e-4 * b), rtol=1e-5, atol=1e-7)
    result = trainer.fit()
    alpha, scale = teacher.shape_and_scale()
    assert result["test/acc"] > 0.9
    assert (alpha - 1).abs().min() > 0.5 and (scale - 1).abs().min() > 0.5


def test_a_resumed_robust_loss_run_ends_exactly_like_an_uninterrupted_one(make_config) -> None:
    common = ("teacher.name=adaptive_robust_loss", "optim.lr=0.005", "train.epochs=2")
    straight = Trainer(make_config(*common, "train.run_name=straight"))
    expected = straight.fit()
    first = Trainer(make_config(*common, "train.run_name=cut"))
    first.fit(max_steps=25)
    resumed = Trainer(make_config(*common, f"train.resume={first.run_dir}"))
    assert resumed.fit()["test/acc"] == expected["test/acc"]
    for a, b in zip(
        resumed.teaching.teacher.parameters(), straight.teaching.teacher.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    assert str(resumed.teaching.optimizer.state_dict()) == str(
        straight.teaching.optimizer.state_dict()
    )


def test_a_teacher_that_cannot_fit_the_student_is_a_config_error(make_config) -> None:
    with pytest.raises(
        ConfigError,
        match=r"teacher 'deep_interaction' \(teacher.name\) .*I3 is not available: MLP has 0 stage",
    ):
        Trainer(make_config("teacher.name=deep_interaction", "teacher.kwargs.features=[I3]"))


@pytest.mark.parametrize(
    ("teacher", "strategy"),
    [
        (["teacher.name=deep_interaction", "teacher.hypergrad.inner_steps=4"], Reversible),
        (["teacher.name=learning_to_reweight"], ExampleGradients),
        (["teacher.name=focal", "teacher.kwargs.gamma=1.0"], StudentOnly),
        (["teacher.name=self_paced"], StudentOnly),
        (["teacher.name=mentornet_pd"], StudentOnly),
        (["teacher.name=random_filter", "teacher.kwargs.keep=0.7"], StudentOnly),
    ],
)
def test_each_teacher_trains_a_student(make_config, teacher: list[str], strategy: type) -> None:
    trainer = Trainer(
        make_config(*teacher, "train.epochs=3", "noise.type=symmetric", "noise.rate=0.2")
    )
    assert type(trainer.teaching.strategy) is strategy
    assert trainer.fit()["test/acc"] > 0.7
