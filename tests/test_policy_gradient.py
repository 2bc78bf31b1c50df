"""The non-differentiable path: a sampling teacher learns by REINFORCE through the same loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metateach.config import load_config
from metateach.engine import Reinforce
from metateach.errors import ConfigError
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import PolicyGradient, Teacher
from metateach.trainer import Trainer


@TEACHERS.register("test_coin_filter")
class CoinFilter(Teacher):
    """Keeps each sample with probability sigmoid(logit); rewarded by the final validation accuracy."""

    learns = PolicyGradient(baseline_decay=0.5)

    def __init__(self) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(0.3))
        self.score = (
            0.0  # sum over an episode's choices of d log pi / d logit = (kept - p), by hand
        )
        self.scores: list[float] = []  # each finished episode's

    def forward(self, batch, view) -> Lesson:
        p = torch.sigmoid(self.logit).expand(len(batch.y))
        keep = torch.bernoulli(p.detach()).bool()
        self.score += float((keep.double() - p.detach().double()).sum())
        return Lesson(mask=keep, log_prob=torch.where(keep, p.log(), (1 - p).log()).sum())

    def episode_reward(self, history, context) -> float:
        self.scores.append(self.score)
        self.score = 0.0
        return history[-1]["val/acc"]


@TEACHERS.register("test_unrewarded")
class Unrewarded(Teacher):
    """Declares REINFORCE but defines no episode_reward to score a run by."""

    learns = PolicyGradient()

    def forward(self, batch, view) -> Lesson:
        return Lesson(mask=torch.ones_like(batch.y, dtype=torch.bool))


def test_reinforce_steps_the_teacher_once_per_episode_on_its_score(make_config) -> None:
    teacher = (
        "teacher.name=test_coin_filter",
        "teacher.optim.name=sgd",
        "teacher.optim.lr=0.01",
        "teacher.optim.momentum=0",
        "train.episodes=2",
        # The coin keeps its own tally of every draw; diagnostic passes would add to it.
        "logging.diagnostics=false",
    )
    trainer = Trainer(make_config(*teacher, "train.run_name=pg"))
    assert isinstance(trainer.teaching.strategy, Reinforce)
    start = trainer.teaching.teacher.logit.item()
    trainer.fit()
    coin = trainer.teaching.teacher
    r1, r2 = [record["teacher/reward"] for record in trainer.state.episodes]
    assert (r1, r2) == tuple(e["episode/val_acc"] for e in trainer.state.episodes)
    # The baseline starts at the first reward, so the first episode does not step; the
    # second is one SGD step on -(r - b) S: logit += lr * (r2 - r1) * S2.
    assert coin.logit.item() == pytest.approx(start + 0.01 * (r2 - r1) * coin.scores[1], rel=1e-5)
    assert trainer.state.episodes[0]["teacher/advantage"] == 0.0
    assert trainer.teaching.strategy.baseline == pytest.approx(0.5 * r1 + 0.5 * r2)
    # Resuming the finished run does not reward the last episode twice.
    after = coin.logit.item()
    again = Trainer(make_config(*teacher, f"train.resume={trainer.run_dir}"))
    again.fit()
    assert again.teaching.teacher.logit.item() == after
    assert again.teaching.strategy.episodes == 2


def test_a_policy_gradient_teacher_needs_a_reward() -> None:
    with pytest.raises(
        ConfigError,
        match="teacher 'test_unrewarded' learns by policy gradient but defines no episode_reward",
    ):
        load_config(None, ["teacher.name=test_unrewarded"])
    with pytest.raises(ConfigError, match="does not learn by hypergradient"):
        load_config(None, ["teacher.name=test_coin_filter", "teacher.hypergrad.method=unrolled"])
