"""Where a run is: the records its checkpoint keeps, and how a step's statistics add up.

Plain numbers, so that they go into checkpoints as they are (``asdict``)
and come back with :meth:`TrainState.from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from metateach.data import derive_seed
from metateach.logging import current_names
from metateach.types import StepStats

__all__ = ["EpochTotals", "TrainState", "LossAverage", "episode_seed"]


@dataclass
class EpochTotals:
    """Running sums over the epoch in progress."""

    loss_sum: float = 0.0
    correct: int = 0
    clean_correct: int = 0  # predictions that match the true label of a (noisy) sample
    seen: int = 0
    learned: int = 0  # samples the student learned from (those its lessons kept)
    seconds: float = 0.0  # time spent in student steps


@dataclass
class TrainState:
    """Where the run is and what it has seen."""

    epoch: int = 0  # the epoch in progress, from 0
    batch: int = 0  # batches of that epoch already done
    step: int = 0  # student steps since the start of the episode
    #: Samples learned from since the start of the episode (counted to the last sync).
    learned: int = 0
    examined: int = 0  # samples looked at for them (a refilling filter's candidates), likewise
    totals: EpochTotals = field(default_factory=EpochTotals)
    best_val_acc: float = -1.0
    best_epoch: int = 0
    test_acc_at_best: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)  # one record per finished epoch
    #: [step, samples learned from, validation accuracy] at every evaluation.
    evals: list[list[float]] = field(default_factory=list)
    target_step: int | None = None  # when validation accuracy first reached train.target_val_acc
    target_samples: int | None = None  # the samples learned from by then
    target_examined: int | None = None  # the samples examined by then
    stopped: bool = False  # ended at the target (train.stop_at_target)
    finished: bool = False  # all epochs done and the end of the run handled
    episode: int = 0  # the student in training (train.episodes), from 0
    steps_before: int = 0  # steps of the earlier episodes: logs count steps across all
    episodes: list[dict[str, float]] = field(default_factory=list)  # one record per episode

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved (:func:`dataclasses.asdict`); an older checkpoint's
        records under today's metric names."""
        return cls(**{
            **saved,
            "totals": EpochTotals(**saved["totals"]),
            "history": [current_names(r) for r in saved["history"]],
            "episodes": [current_names(r) for r in saved["episodes"]],
        })  # fmt: skip

    def add(self, stats: StepStats, seconds: float) -> EpochTotals:
        """Add steps' statistics, taken over ``seconds``, to the epoch's totals and the run's counts."""
        totals = self.totals
        totals.loss_sum += stats.loss_sum
        totals.correct += int(stats.correct)
        totals.clean_correct += int(stats.clean_correct)
        totals.learned += int(stats.learned)
        totals.seconds += seconds
        self.learned += int(stats.learned)
        self.examined += int(stats.examined)
        return totals

    @property
    def global_step(self) -> int:
        """Steps since the run began, over all episodes: the step logs are kept at."""
        return self.steps_before + self.step

    def latest(self) -> dict[str, float]:
        """The last finished epoch's record (empty before the first)."""
        return dict(self.history[-1]) if self.history else {}

    def note_evaluation(self, val_acc: float, target: float | None, stop_at_target: bool) -> bool:
        """Record an evaluation at this step; whether it is the first to reach ``target``."""
        self.evals.append([self.step, self.learned, val_acc])
        if target is None or self.target_step is not None or val_acc < target:
            return False
        self.target_step, self.target_samples = self.step, self.learned
        self.target_examined = self.examined
        self.stopped = stop_at_target
        return True

    def next_episode(self) -> TrainState:
        """The state a fresh student starts the next episode from; the episodes' records go on."""
        return TrainState(
            episode=self.episode + 1,
            steps_before=self.steps_before + self.step,
            episodes=self.episodes,
        )

    def episode_record(self) -> dict[str, float]:
        """What this episode's student did: its steps, samples, accuracy, and when it reached the target."""
        last = self.latest()
        record = {
            "trainer/episode": self.episode + 1,
            "episode/steps": self.step,
            "episode/samples_learned": self.learned,
            "episode/samples_examined": self.examined,
            "episode/val_acc": last.get("val/acc", 0.0),
            "episode/test_acc": last.get("test/acc", 0.0),
        }
        if self.target_step is not None:
            record["episode/target_step"] = self.target_step
            record["episode/target_samples"] = self.target_samples
        return record

    def summary(self, realized_noise: float, has_target: bool) -> dict[str, float | None]:
        """The run's summary: the last epoch's and best accuracies, its counts, and its target."""
        last = self.latest()
        return {
            "test/acc": last["test/acc"],
            "test/acc_at_best_val": self.test_acc_at_best,
            "val/acc": last["val/acc"],
            "val/best_acc": self.best_val_acc,
            "trainer/best_epoch": self.best_epoch,
            "noise/realized_rate": realized_noise,
            "trainer/steps": self.step,
            "trainer/samples_learned": self.learned,
            "trainer/samples_examined": self.examined,
            "trainer/episodes": self.episode + 1,
            # None: the run never reached its target.
            **(self.target_record() if has_target else {}),
        }

    def target_record(self) -> dict[str, int | None]:
        """What reaching ``train.target_val_acc`` took: the step, samples learned from and examined (None before)."""
        return {
            "target/step": self.target_step,
            "target/samples_learned": self.target_samples,
            "target/samples_examined": self.target_examined,
        }


class LossAverage:
    """The student's average batch loss so far, as a teacher reads it (``TeachingContext.avg_train_loss``).

    ``mode`` is ``mean`` (over the episode's steps so far) or ``ema`` (0.9 old +
    0.1 new, the first loss to start); see ``teacher.loss_average``.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.value = torch.zeros((), device=device, dtype=torch.float64)

    def update(self, batch_loss: Tensor, step: int) -> None:
        """Take in the loss of the batch of step ``step`` (from 0), on the device."""
        if self.mode == "mean":  # this step included
            self.value = self.value + (batch_loss - self.value) / (step + 1)
        elif step == 0:
            self.value = batch_loss.clone()
        else:
            self.value = 0.9 * self.value + 0.1 * batch_loss


def episode_seed(seed: int, episode: int) -> int:
    """The seed of an episode's student and data order: the run's own for the first."""
    return seed if episode == 0 else derive_seed(seed, episode)
