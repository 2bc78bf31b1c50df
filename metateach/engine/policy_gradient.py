"""REINFORCE: the learning path of teachers that cannot be differentiated through the student.

References:
    Williams, "Simple statistical gradient-following algorithms for
    connectionist reinforcement learning", Machine Learning 1992.
    Fan, Tian, Qin, Li and Liu, "Learning to Teach", ICLR 2018.
    Sehnke, Osendorfer, Rückstieß, Graves, Peters and Schmidhuber,
    "Parameter-exploring policy gradients", Neural Networks 2010.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, autograd

from metateach.data import Batch, derive_seed
from metateach.engine.problem import BilevelProblem
from metateach.engine.strategy import TeachingStrategy
from metateach.registry import STRATEGIES
from metateach.teacher import PolicyGradient, TeachingContext

__all__ = ["Reinforce"]


@STRATEGIES.register("reinforce")
class Reinforce(TeachingStrategy):
    """The teacher acts during a run; at its end, one REINFORCE step on the whole episode.

    The score S of the run's exploration (see
    :class:`~metateach.teacher.PolicyGradient`) is gathered as the run goes:
    with ``exploration="actions"`` each step adds the gradient of the
    lesson's ``log_prob`` (the size of the teacher, not a graph per step);
    with ``"parameters"`` the first step of an episode moves the teacher to
    theta + eps and S = eps / noise_std^2. At the end of the run the teacher
    scores it with ``episode_reward`` and steps (from theta) on -(r - b) S,
    where the baseline b is a moving average of the rewards. It starts at
    the first reward, so the first episode does not step: a baseline of 0
    would reinforce every choice of the early episodes by the whole reward.
    With ``teacher.refill``, every decision on every candidate batch counts.

    Args:
        problem: the bilevel problem.
        settings: the teacher's declaration, with the config's
            ``teacher.policy``: the baseline's decay
            (b <- decay * b + (1 - decay) * r after each episode), the
            exploration, and for ``parameters`` eps's standard deviation and
            whether episodes 2k and 2k + 1 draw +eps and -eps (mirrored).
        seed: eps of episode k comes from a generator seeded by (``seed``, k).
    """

    def __init__(self, problem: BilevelProblem, settings: PolicyGradient, seed: int = 0) -> None:
        super().__init__(problem)
        self.settings = settings
        self.seed = seed
        self.score = [torch.zeros_like(p) for p in problem.teacher_params()]
        self.baseline: float | None = None  # before the first episode, none
        self.episodes = 0
        self.perturbed: int | None = None  # the episode whose eps the teacher carries
        self.theta: list[Tensor] = []  # the teacher's parameters before eps (while perturbed)

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        if self.settings.exploration == "parameters":
            self._perturb(context.episode)
            real = problem.real_pass(batch, context, teacher_grad=False)
        else:
            real = problem.real_pass(batch, context, teacher_grad=True)
            if real.log_prob is None:
                raise RuntimeError(
                    f"{type(problem.teacher).__name__} learns by policy gradient over its actions: "
                    "its lessons need log_prob"
                )
            grads = autograd.grad(
                real.log_prob, problem.teacher_params(), retain_graph=True, allow_unused=True
            )
            for total, g in zip(self.score, grads, strict=True):
                if g is not None:
                    total += g
        problem.descend(real.train, real.batch, real.rng)
        return problem.statistics(real.train.view, real.batch, real.train.lesson, real.examined)

    def _perturb(self, episode: int) -> None:
        """At an episode's first step: theta <- theta + eps, and the score S = eps / noise_std^2."""
        if self.perturbed == episode:
            return
        pair, sign = (episode // 2, (-1) ** episode) if self.settings.mirrored else (episode, 1)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, pair))
        params = self.problem.teacher_params()
        self.theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.score, strict=True):
                eps = sign * self.settings.noise_std * torch.randn(p.shape, generator=generator)
                p.add_(eps.to(p.device))
                s.copy_(eps / self.settings.noise_std**2)
        self.perturbed = episode

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        assert self.problem.teacher is not None
        reward = float(self.problem.teacher.episode_reward(history, context))
        baseline = reward if self.baseline is None else self.baseline
        advantage = reward - baseline
        if self.perturbed is not None:  # back to theta, from which the teacher steps
            with torch.no_grad():
                for p, theta in zip(self.problem.teacher_params(), self.theta, strict=True):
                    p.copy_(theta)
            self.perturbed, self.theta = None, []
        updated = self.problem.teacher_step([-advantage * s for s in self.score])
        self.record(
            **{
                "teacher/reward": reward,
                "teacher/baseline": baseline,
                "teacher/advantage": advantage,
            }
        )
        self.count("teacher/skipped_steps", 0 if updated else 1)
        self.baseline = (
            self.settings.baseline_decay * baseline + (1 - self.settings.baseline_decay) * reward
        )
        self.episodes += 1
        for s in self.score:
            s.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "score": [s.clone() for s in self.score], "baseline": self.baseline,
                "episodes": self.episodes, "perturbed": self.perturbed,
                "theta": [t.clone() for t in self.theta]}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for s, saved in zip(self.score, state["score"], strict=True):
            s.copy_(saved)
        self.baseline, self.episodes = state["baseline"], state["episodes"]
        self.perturbed, self.theta = state["perturbed"], [t.clone() for t in state["theta"]]
