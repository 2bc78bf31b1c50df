"""L2T: the data filter's state, its draws and their log-probability, its reward, and REINFORCE."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metateach.config import load_config
from metateach.data import Batch
from metateach.engine import Reinforce
from metateach.engine.refill import refilled
from metateach.errors import ConfigError
from metateach.lab.reinforce_noise import estimates, estimator_noise, noise_of, reward_along
from metateach.lesson import Lesson
from metateach.logging import read_metrics
from metateach.registry import TEACHERS
from metateach.teacher import PolicyGradient, StudentView, Teacher, TeachingContext
from metateach.teachers.l2t import L2TFilter, l2t_features, speed_reward
from metateach.trainer import Trainer

from .conftest import without_measurements


def context(step: int = 30, total: int = 120) -> TeachingContext:
    return TeachingContext(step, 1, total, torch.tensor(0.7, dtype=torch.float64), 0.85)


def view_of(logits: torch.Tensor, y: torch.Tensor, step: int = 30) -> StudentView:
    losses = F.cross_entropy(logits, y, reduction="none")
    return StudentView(logits, losses, logits, (), context(step))


def test_the_state_holds_the_papers_features_per_sample() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 3, 9, 3])
    logits = torch.randn(4, 10)
    batch = Batch(x, y, torch.arange(4))
    state = l2t_features(batch, view_of(logits, y), 10, image_stats=False)
    assert state.shape == (4, 25)  # L2T's MNIST teacher is 25-12-1
    probs = logits.softmax(dim=1)
    assert torch.equal(state[:, :10], F.one_hot(y, 10).float())
    assert torch.allclose(state[:, 10:13], torch.tensor([30 / 120, 0.7, 0.85]).expand(4, 3))
    assert torch.allclose(state[:, 13:23], probs)
    assert torch.allclose(state[:, 23], F.cross_entropy(logits, y, reduction="none"))
    for i in range(4):
        rest = torch.cat([probs[i, : y[i]], probs[i, y[i] + 1 :]])
        assert state[i, 24].item() == pytest.approx((probs[i, y[i]] - rest.max()).item(), abs=1e-6)
    with_stats = l2t_features(batch, view_of(logits, y), 10, image_stats=True)
    assert with_stats.shape == (4, 27)
    assert torch.allclose(with_stats[:, 10], x.flatten(1).mean(dim=1))
    assert torch.allclose(with_stats[:, 11], x.flatten(1).std(dim=1))


def test_the_reward_is_minus_log_of_the_share_of_the_budget_used() -> None:
    assert speed_reward(100, 1000) == pytest.approx(math.log(10))
    assert speed_reward(1000, 1000) == 0.0
    assert speed_reward(None, 1000) == 0.0  # never reached
    assert speed_reward(0, 1000) == pytest.approx(math.log(1000))  # reached before any step
    assert speed_reward(50, 1000) > speed_reward(100, 1000)


def test_the_filter_draws_from_its_policy_and_reports_the_draws_log_probability() -> None:
    torch.manual_seed(0)
    teacher = L2TFilter(num_classes=10, target_val_acc=0.9, init_keep=0.7)
    y = torch.randint(0, 10, (4000,))
    batch = Batch(torch.zeros(4000, 1), y, torch.arange(4000))
    view = view_of(torch.zeros(4000, 10), y)
    p = teacher.keep_probability(batch, view)
    mean = float(p.detach().mean())
    # The untrained policy starts near init_keep: the hidden layer moves it only a little.
    assert 0.55 < mean < 0.85
    lesson = teacher(batch, view)
    assert abs(float(lesson.mask.float().mean()) - mean) < 0.03
    expected = torch.where(lesson.mask, p.log(), (1 - p).log()).sum()
    assert lesson.log_prob.item() == pytest.approx(expected.item(), rel=1e-5)
    # d log pi / d theta flows into the policy.
    lesson.log_prob.backward()
    assert (
        teacher.policy[0].weight.grad is not None and teacher.policy[0].weight.grad.abs().sum() > 0
    )
    # The draws follow (seed, episode, step): the same step draws the same mask afresh (a
    # resumed run), a second batch of one step continues the stream (a refill), another
    # step draws anew.
    again = L2TFilter(num_classes=10, target_val_acc=0.9)
    again.load_state_dict(teacher.state_dict())
    assert torch.equal(again(batch, view).mask, lesson.mask)
    assert not torch.equal(teacher(batch, view).mask, lesson.mask)
    assert not torch.equal(again(batch, view_of(view.logits, y, step=31)).mask, lesson.mask)
    greedy = L2TFilter(num_classes=10, target_val_acc=0.9, greedy=True)
    greedy.load_state_dict(teacher.state_dict())
    assert torch.equal(greedy(batch, view).mask, p.detach() >= 0.5)


@TEACHERS.register("test_two_armed")
class TwoArmedBandit(Teacher):
    """Each step pulls arm 1 with probability sigmoid(logit), arm 0 otherwise; arm 1 pays more.

    The lesson keeps every sample, so the student is the same whatever the
    arms: the reward depends on the teacher's choices alone.
    """

    learns = PolicyGradient(baseline_decay=0.8)
    payoff = (0.2, 0.8)

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(0.0))
        self.pulls: list[int] = []
        self.noise = torch.Generator().manual_seed(1)

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        p = torch.sigmoid(self.logit)
        arm = int(torch.rand((), generator=self.noise) < p.detach())
        self.pulls.append(arm)
        log_prob = p.log() if arm else (1 - p).log()
        return Lesson(mask=torch.ones(len(batch.y), dtype=torch.bool), log_prob=log_prob)

    def episode_reward(self, history, context) -> float:
        paid = [
            self.payoff[a] + 0.1 * float(torch.randn((), generator=self.noise)) for a in self.pulls
        ]
        self.pulls.clear()
        return sum(paid) / len(paid)


EXPLORATION = {
    "actions": [],  # L2T: the score of each pull
    "parameters": ["teacher.policy={exploration: parameters, noise_std: 1.0}"],
    "mirrored": ["teacher.policy={exploration: parameters, noise_std: 1.0, mirrored: true}"],
}


@pytest.mark.parametrize("exploration", list(EXPLORATION))
@pytest.mark.parametrize("better", [1, 0])
def test_reinforce_moves_a_two_armed_policy_toward_the_better_arm(
    make_config, better: int, exploration: str
) -> None:
    trainer = Trainer(
        make_config(
            "teacher.name=test_two_armed",
            "teacher.optim.name=sgd",
            "teacher.optim.lr=0.5",
            "teacher.optim.momentum=0",
            "logging.diagnostics=false",
            *EXPLORATION[exploration],
        )
    )
    strategy, bandit = trainer.teaching.strategy, trainer.teaching.teacher
    assert isinstance(strategy, Reinforce)
    bandit.payoff = (0.2, 0.8) if better == 1 else (0.8, 0.2)
    batches = list(trainer.train_loader.epoch(0))[:5]
    chose_better = []
    for episode in range(40):  # episodes of 5 steps
        for step, batch in enumerate(batches):
            strategy.step(batch, context(step, len(batches))._replace(episode=episode))
        chose_better.append(sum(a == better for a in bandit.pulls) / len(bandit.pulls))
        strategy.end_of_run([], context(len(batches), len(batches))._replace(episode=episode))
    p_better = (
        torch.sigmoid(bandit.logit).item() if better else 1 - torch.sigmoid(bandit.logit).item()
    )
    assert p_better > 0.8  # from 0.5
    assert sum(chose_better[-10:]) / 10 > sum(chose_better[:10]) / 10 + 0.2
    # The moving-average baseline tracks the rewards of the better arm.
    assert 0.6 < strategy.baseline < 0.85


def test_an_l2t_run_filters_stops_at_the_target_and_is_rewarded_for_speed(make_config) -> None:
    cfg = make_config(
        "teacher.name=l2t",
        "train.epochs=4",
        "train.eval_every_steps=4",
        "train.target_val_acc=0.8",
        "train.stop_at_target=true",
        "logging.diagnostics=false",
    )
    trainer = Trainer(cfg)
    start = [p.detach().clone() for p in trainer.teaching.teacher.parameters()]
    trainer.fit()
    state = trainer.state
    assert state.stopped and state.step == state.target_step
    # About half the samples are kept (init_keep 0.5), in batches of 64.
    assert 0.3 < state.learned / (state.step * 64) < 0.7
    # One REINFORCE step at the end, on r = -log(i_tau / T'), T' = 4 epochs of 20 steps.
    (reward,) = [
        r["teacher/reward"] for r in read_metrics(trainer.run_dir) if "teacher/reward" in r
    ]
    assert reward == pytest.approx(-math.log(state.step / (4 * 20))) and reward > 0
    # The baseline starts at the first reward: a first episode teaches the teacher nothing.
    for before, after in zip(start, trainer.teaching.teacher.parameters(), strict=True):
        assert torch.equal(before, after)


def test_l2t_needs_a_target_accuracy(make_config) -> None:
    with pytest.raises(ConfigError, match="train.target_val_acc"):
        Trainer(make_config("teacher.name=l2t"))


EPISODES = (
    "teacher.name=l2t", "teacher.refill=true", "train.epochs=2", "train.episodes=3",
    "train.eval_every_steps=4", "train.target_val_acc=0.8", "train.stop_at_target=true",
    "logging.diagnostics=false",
)  # fmt: skip


@pytest.mark.parametrize("exploration", ["actions", "mirrored"])
def test_a_teacher_learns_over_episodes_of_fresh_students_and_resumes_exactly(
    make_config, exploration: str
) -> None:
    episodes_of = (*EPISODES, *EXPLORATION[exploration])
    straight = Trainer(make_config(*episodes_of, "train.run_name=straight", "logging.plots=true"))
    start = [p.detach().clone() for p in straight.teaching.teacher.parameters()]
    straight.fit()
    moved = zip(start, straight.teaching.teacher.parameters(), strict=True)
    assert not all(torch.equal(a, b) for a, b in moved)  # episodes 2 and 3 stepped it
    episodes = straight.state.episodes
    assert [r["trainer/episode"] for r in episodes] == [1, 2, 3]
    assert straight.teaching.strategy.episodes == 3  # one REINFORCE step each
    for record in episodes:  # each student stopped at its target, rewarded for its speed
        assert record["episode/steps"] == record["episode/target_step"]
        assert record["teacher/reward"] == pytest.approx(-math.log(record["episode/steps"] / 40))
    logged = read_metrics(straight.run_dir)
    assert [r["step"] for r in logged] == sorted(r["step"] for r in logged)
    assert straight.state.global_step == sum(r["episode/steps"] for r in episodes)
    # Each student starts afresh: its first evaluation is far below where the last one ended.
    first_evals = [r["eval/val_acc"] for r in logged if "eval/val_acc" in r and r["step"] in (
        4, episodes[0]["episode/steps"] + 4, episodes[0]["episode/steps"] + episodes[1]["episode/steps"] + 4)]  # fmt: skip
    assert len(first_evals) == 3 and max(first_evals) < 0.8
    assert (straight.run_dir / "episodes.png").stat().st_size > 10_000

    cut = Trainer(make_config(*episodes_of, "train.run_name=cut"))
    cut.fit(max_steps=episodes[0]["episode/steps"] + 3)
    assert cut.state.episode == 1 and cut.state.step == 3
    resumed = Trainer(make_config(*episodes_of, f"train.resume={cut.run_dir}"))
    resumed.fit()
    assert [without_measurements(r) for r in resumed.state.episodes] == [
        without_measurements(r) for r in episodes
    ]
    for a, b in zip(
        straight.teaching.teacher.parameters(), resumed.teaching.teacher.parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_exploring_in_parameters_acts_with_theta_plus_eps_and_steps_from_theta(make_config) -> None:
    trainer = Trainer(
        make_config(
            "teacher.name=l2t",
            "train.target_val_acc=0.8",
            "teacher.policy={exploration: parameters, noise_std: 0.05, mirrored: true}",
        )
    )
    strategy, teacher = trainer.teaching.strategy, trainer.teaching.teacher
    theta = [p.detach().clone() for p in teacher.parameters()]
    batch = next(iter(trainer.train_loader))
    seen = []
    for episode in range(2):  # a mirrored pair: +eps, then -eps
        for step in range(3):
            strategy.step(batch, context(step)._replace(episode=episode))
            seen.append([p.detach().clone() for p in teacher.parameters()])
        eps = [a - b for a, b in zip(seen[-1], theta, strict=True)]
        # Constant through the episode, of the asked size, and its score is eps / sigma^2.
        assert all(torch.equal(x, y) for x, y in zip(seen[-3], seen[-1], strict=True))
        flat = torch.cat([e.flatten() for e in eps])
        assert flat.std().item() == pytest.approx(0.05, rel=0.2)
        for e, score in zip(eps, strategy.score, strict=True):
            torch.testing.assert_close(score, e / 0.05**2)
        strategy.end_of_run([], context(3)._replace(episode=episode))
        if episode == 0:
            first = flat
            # The first reward sets the baseline: no step, and theta is back exactly.
            for a, b in zip(teacher.parameters(), theta, strict=True):
                assert torch.equal(a, b)
    torch.testing.assert_close(flat, -first)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "teacher.policy={explore: parameters}",
            r"unknown key 'teacher.policy.explore'; valid keys in 'teacher.policy': "
            r"baseline_decay, exploration, noise_std, mirrored",
        ),
        (
            "teacher.policy.exploration=weights",
            r"teacher.policy of teacher 'l2t': exploration must be 'actions' or 'parameters'",
        ),
        ("teacher.policy={exploration: parameters, noise_std: 0}", "noise_std must be > 0"),
        ("teacher.policy.noise_std=abc", r"teacher.policy.noise_std"),
        (  # where REINFORCE's settings used to go
            "teacher.hypergrad.options={exploration: parameters}",
            r"teacher.hypergrad.options is set, but teacher 'l2t' does not learn by hypergradient "
            r"\(it learns by REINFORCE from the lessons it samples; its settings go in teacher.policy\)",
        ),
    ],
)
def test_bad_policy_gradient_settings_name_the_key(make_config, setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(make_config("teacher.name=l2t", "train.target_val_acc=0.8", setting))


def test_a_policy_setting_for_a_teacher_that_learns_otherwise_is_refused(make_config) -> None:
    with pytest.raises(
        ConfigError,
        match=r"teacher.policy.noise_std is set, but teacher 'meta_weight_net' does not learn by "
        r"REINFORCE \(it learns by hypergradient; its settings go in teacher.hypergrad\)",
    ):
        make_config("teacher.name=meta_weight_net", "teacher.policy.noise_std=0.5")


def test_naming_another_teacher_drops_the_policy_settings(tmp_path) -> None:
    config = tmp_path / "l2t.yaml"
    config.write_text(
        "teacher: {name: l2t, policy: {exploration: parameters, noise_std: 0.5}}\n"
        "train: {target_val_acc: 0.8}\n"
    )
    cfg = load_config(config, ["teacher.name=random_filter"])
    assert (cfg.teacher.policy.exploration, cfg.teacher.policy.noise_std) == (None, None)


def test_episodes_need_a_teacher_that_learns_from_them(make_config) -> None:
    with pytest.raises(ConfigError, match="train.episodes=3 trains one teacher over several"):
        make_config("train.episodes=3", "teacher.name=random_filter")


@TEACHERS.register("test_low_labels")
class LowLabels(Teacher):
    """Keeps the samples of labels 0-4, with log-probability -(the number of decisions)."""

    learns = PolicyGradient()

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(mask=batch.y < 5, log_prob=-self.scale * len(batch.y))

    def episode_reward(self, history, context) -> float:
        return 0.0


def test_a_refilled_batch_is_full_of_kept_samples_and_counts_every_decision(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=test_low_labels", "teacher.refill=true"))
    problem = trainer.teaching.strategy.problem
    batch = next(iter(trainer.train_loader))
    full, log_prob, examined = refilled(problem, batch, trainer.context(), teacher_grad=True)
    assert len(full.y) == len(batch.y) == 64 and bool((full.y < 5).all())
    # The batch's own kept samples come first, in order; then those of further batches.
    own = batch.index[batch.y < 5]
    assert torch.equal(full.index[: len(own)], own)
    assert len(set(full.index.tolist())) == 64
    drawn = problem.refill.position  # candidate batches beyond the first
    assert drawn >= 1 and log_prob.item() == -64 * (drawn + 1)
    assert examined == 64 * (drawn + 1)


def test_refilled_filters_train_on_full_batches(make_config) -> None:
    plain = Trainer(make_config("teacher.name=random_filter", "teacher.kwargs.keep=0.5"))
    plain.fit()
    refilled = Trainer(
        make_config("teacher.name=random_filter", "teacher.kwargs.keep=0.5", "teacher.refill=true")
    )
    refilled.fit()
    seen = 2 * len(plain.data.train)
    assert plain.state.learned < 0.6 * seen
    assert refilled.state.learned == seen  # every step as full as its batch
    # Without refilling a step examines its batch; with it, every candidate batch it drew
    # (at keep 0.5 about 2 per kept sample, and the last one whole).
    assert plain.state.examined == seen
    assert 2 * seen < refilled.state.examined < 3 * seen
    summary = json.loads((refilled.run_dir / "summary.json").read_text())
    assert summary["trainer/samples_examined"] == refilled.state.examined
    with pytest.raises(ConfigError, match="teacher.refill fills batches"):
        make_config("teacher.name=meta_weight_net", "optim.name=sgd", "teacher.refill=true")


def test_a_trained_teacher_teaches_a_new_student_of_another_architecture_frozen(
    make_config,
) -> None:
    taught = ("train.eval_every_steps=4", "train.target_val_acc=0.8", "logging.diagnostics=false")
    teacher_run = Trainer(make_config("teacher.name=l2t", "train.run_name=teacher", *taught))
    teacher_run.fit()
    saved = {k: v.clone() for k, v in teacher_run.teaching.teacher.state_dict().items()}
    student = Trainer(
        make_config(
            "teacher.name=l2t",
            "teacher.learn=false",
            "teacher.refill=true",
            f"teacher.checkpoint={teacher_run.run_dir / 'checkpoints' / 'last.pt'}",
            "model.kwargs.hidden=[64, 32]",
            "data.train_half=1",
            "train.run_name=student",
            *taught,
        )  # fmt: skip
    )
    assert not isinstance(student.teaching.strategy, Reinforce)  # frozen: a fixed rule
    student.fit()
    for key, value in student.teaching.teacher.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # It filtered (batches were refilled, to full) and the new student learned.
    assert student.teaching.strategy.problem.refill.position > 0
    assert student.state.learned == 2 * len(student.data.train)
    assert student.state.target_step is not None


def test_the_noise_of_an_estimate_against_hand_computed_values() -> None:
    """Rewards 1, 2, 3, 6 (leave-one-out baselines 11/3, 10/3, 3, 2) on scores that are the unit
    vectors e0, e0, e1, e1: g = (r - b) S by hand, its mean, standard error, and the cosine of
    the halves' means."""
    rewards = [1.0, 2.0, 3.0, 6.0]
    scores = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]),
              torch.tensor([0.0, 1.0])]  # fmt: skip
    advantages = [r - (sum(rewards) - r) / 3 for r in rewards]  # -8/3, -4/3, 0, 4
    g = torch.tensor(
        [[advantages[0], 0], [advantages[1], 0], [0, advantages[2]], [0, advantages[3]]]
    )
    found = noise_of(rewards, scores, "actions")
    mean = g.mean(0)
    error = math.sqrt(float(g.var(0).sum()) / 4)
    assert found.mean_norm == pytest.approx(float(mean.norm()))
    assert found.standard_error == pytest.approx(error)
    # Noise alone lifts |mean g|: the true mean's norm is estimated without it.
    assert found.snr == pytest.approx(math.sqrt(max(float(mean.norm()) ** 2 - error**2, 0)) / error)
    assert found.split_cosine == pytest.approx(0.0)  # the halves point along e0 and e1
    assert found.reward_mean == pytest.approx(3.0)
    with pytest.raises(ValueError, match="need at least 4 episodes"):
        noise_of(rewards[:3], scores[:3], "actions")


def test_the_noise_of_l2t_s_estimate_is_measured_at_a_policy_held_still(make_config) -> None:
    cfg = make_config(*EPISODES, "train.episodes=4")
    found = estimator_noise(cfg)
    assert found.episodes == 4 and found.exploration == "actions"
    assert found.standard_error > 0 and math.isfinite(found.snr)
    with pytest.raises(ValueError, match="teacher 'focal' does not learn by REINFORCE"):
        estimator_noise(make_config("teacher.name=focal"))


def test_the_line_search_runs_students_at_the_policy_moved_along_the_estimate(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(*EPISODES, "train.episodes=2")
    moved: dict[float, list[torch.Tensor]] = {}
    fit = Trainer.fit

    def spy(self, *args, **kwargs):  # the policy each run starts from
        moved[len(moved)] = [
            p.detach().clone() for p in self.teaching.strategy.problem.teacher_params()
        ]
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    start = [p.detach().clone() for p in Trainer(make_config(*EPISODES, "train.run_name=start"))
             .teaching.strategy.problem.teacher_params()]  # fmt: skip
    size = sum(p.numel() for p in start)
    direction = torch.zeros(size, dtype=torch.float64)
    direction[0], direction[-1] = 3.0, 4.0  # unit: 0.6 and 0.8
    found = reward_along(cfg, direction, [0.0, 5.0])
    assert list(found) == [0.0, 5.0] and all(math.isfinite(m) for m, _ in found.values())
    for run, distance in enumerate((0.0, 5.0)):
        offset = torch.cat([(p - s).flatten() for p, s in zip(moved[run], start, strict=True)])
        expected = torch.zeros(size)
        expected[0], expected[-1] = 0.6 * distance, 0.8 * distance
        assert torch.allclose(offset, expected, atol=1e-6), distance


def test_each_episodes_estimate_by_hand() -> None:
    rewards = [1.0, 2.0, 3.0, 6.0]
    scores = [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]),
              torch.tensor([2.0, 0.0])]  # fmt: skip
    advantages = [-8 / 3, -4 / 3, 0.0, 4.0]  # r minus the others' mean
    expected = torch.tensor(
        [[a * x for x in s.tolist()] for a, s in zip(advantages, scores, strict=True)]
    )
    assert torch.allclose(estimates(rewards, scores).float(), expected)
