"""REINFORCE: the learning path of teachers that cannot be differentiated through the student.

References:
    Williams, "Simple statistical gradient-following algorithms for
    connectionist reinforcement learning", Machine Learning 1992.
    Fan, Tian, Qin, Li and Liu, "Learning to Teach", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.hypergrad.base import TeachingStrategy
from metateach.hypergrad.problem import BilevelProblem
from metateach.teacher import TeachingContext

__all__ = ["Reinforce"]


class Reinforce(TeachingStrategy):
    """Sampled lessons during a run; at its end, one REINFORCE step on the whole episode.

    Each step, the teacher's lesson carries ``log_prob``, the log-probability
    of what it sampled; its gradient with respect to the teacher is summed
    over the episode right away (S = sum_t grad log pi_t, the size of the
    teacher, not a graph per step). At the end of the run the teacher scores
    it with ``episode_reward`` and steps on -(r - b) S, where the baseline b
    is a moving average of the rewards. It starts at the first reward, so
    the first episode does not step: a baseline of 0 would reinforce every
    choice of the early episodes by the whole reward. With
    ``teacher.refill``, every decision on every candidate batch counts.

    Args:
        problem: the bilevel problem.
        baseline_decay: b <- decay * b + (1 - decay) * r after each episode.
    """

    def __init__(self, problem: BilevelProblem, baseline_decay: float = 0.9) -> None:
        super().__init__(problem)
        if not 0 <= baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {baseline_decay}")
        self.baseline_decay = baseline_decay
        self.score = [torch.zeros_like(p) for p in problem.teacher_params()]
        self.baseline: float | None = None  # before the first episode, none
        self.episodes = 0

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        real = problem.real_pass(batch, context, teacher_grad=True)
        if real.log_prob is None:
            raise RuntimeError(
                f"{type(problem.teacher).__name__} learns by policy gradient: its lessons need log_prob"
            )
        grads = autograd.grad(
            real.log_prob, problem.teacher_params(), retain_graph=True, allow_unused=True
        )
        for total, g in zip(self.score, grads, strict=True):
            if g is not None:
                total += g
        problem.descend(real.train, real.batch, real.rng)
        return problem.statistics(real.train.view, real.batch, real.train.lesson)

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        assert self.problem.teacher is not None
        reward = float(self.problem.teacher.episode_reward(history, context))
        baseline = reward if self.baseline is None else self.baseline
        advantage = reward - baseline
        updated = self.problem.teacher_step([-advantage * s for s in self.score])
        self.record(
            **{
                "teacher/reward": reward,
                "teacher/baseline": baseline,
                "teacher/advantage": advantage,
            }
        )
        if not updated:
            self.record(**{"teacher/skipped_steps": 1})
        self.baseline = self.baseline_decay * baseline + (1 - self.baseline_decay) * reward
        self.episodes += 1
        for s in self.score:
            s.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "score": [s.clone() for s in self.score], "baseline": self.baseline,
                "episodes": self.episodes}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for s, saved in zip(self.score, state["score"], strict=True):
            s.copy_(saved)
        self.baseline, self.episodes = state["baseline"], state["episodes"]
