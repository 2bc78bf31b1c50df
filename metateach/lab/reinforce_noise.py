"""How noisy a REINFORCE teacher's gradient estimate is, at a policy held still.

L2T's teacher (Fan et al. 2018) learns from one estimate per episode: the
run's reward, less a baseline, times the run's score S (the summed gradients
of the log-probabilities of every keep/drop decision, or, exploring in the
parameters, eps / sigma^2). :func:`estimator_noise` runs ``episodes`` fresh
students under one policy (the teacher's optimizer at a learning rate of
zero, so the policy never moves), keeps each episode's reward r_i and score
S_i, and measures the estimate g_i = (r_i - b_i) S_i, b_i the mean reward of
the other episodes (a baseline that leaves the estimate unbiased):

* ``snr``: |mean g| over the standard error of that mean, sqrt(sum over the
  parameters of var(g) / N). Below about 1 the N episodes' average is mostly
  noise: its direction is the noise's;
* ``split_cosine``: the cosine between the averages of the two halves of the
  episodes. Near 0 the halves disagree on the direction to step.

``python tools/reinforce_noise.py CONFIG [key=value ...] --episodes 20`` prints
both, with the rewards' spread.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from metateach.config import ExperimentConfig, load_config
from metateach.engine.policy_gradient import Reinforce
from metateach.trainer import Trainer

__all__ = ["EstimatorNoise", "estimator_noise", "main", "noise_of"]


@dataclass(frozen=True)
class EstimatorNoise:
    """What :func:`estimator_noise` measured (see the module docstring)."""

    exploration: str
    episodes: int
    reward_mean: float
    reward_std: float
    mean_norm: float  # |mean g|
    standard_error: float  # sqrt(sum var(g) / N)
    snr: float
    split_cosine: float


def noise_of(
    rewards: Sequence[float], scores: Sequence[torch.Tensor], exploration: str
) -> EstimatorNoise:
    """The statistics of the estimates from episodes' ``rewards`` and flattened ``scores``."""
    n = len(rewards)
    if n < 4:
        raise ValueError(f"need at least 4 episodes to measure the noise, got {n}")
    r = torch.tensor(rewards, dtype=torch.float64)
    s = torch.stack([x.double() for x in scores])
    baseline = (r.sum() - r) / (n - 1)  # each episode's: the others' mean reward
    g = (r - baseline)[:, None] * s
    mean = g.mean(0)
    error = math.sqrt(float(g.var(0).sum()) / n)
    half = n // 2
    a, b = g[:half].mean(0), g[half:].mean(0)
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return EstimatorNoise(
        exploration, n, float(r.mean()), float(r.std()), float(mean.norm()), error,
        float(mean.norm()) / max(error, 1e-300), cosine,
    )  # fmt: skip


def estimator_noise(cfg: ExperimentConfig) -> EstimatorNoise:
    """Run the ``train.episodes`` students of ``cfg`` under one policy and measure its estimate's
    noise."""
    trainer = Trainer(cfg)
    strategy = trainer.teaching.strategy
    if not isinstance(strategy, Reinforce):
        raise ValueError(f"teacher '{cfg.teacher.name}' does not learn by REINFORCE")
    strategy.problem.teacher_step = lambda grads: True  # type: ignore[method-assign]
    rewards: list[float] = []
    scores: list[torch.Tensor] = []
    reward_of = strategy.problem.teacher.episode_reward
    end_of_run = strategy.end_of_run

    def kept(history, context):  # type: ignore[no-untyped-def]
        rewards.append(float(reward_of(history, context)))
        scores.append(torch.cat([x.detach().flatten().cpu() for x in strategy.score]))
        end_of_run(history, context)

    strategy.end_of_run = kept  # type: ignore[method-assign]
    trainer.fit()
    return noise_of(rewards, scores, strategy.settings.exploration)


def main(argv: Sequence[str] | None = None, prog: str = "reinforce_noise.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "config", help="a REINFORCE teacher's config, e.g. configs/cpu/l2t_mnist_teacher.yaml"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--episodes", type=int, default=20)
    args = parser.parse_args(argv)
    found = estimator_noise(
        load_config(args.config, [*args.overrides, f"train.episodes={args.episodes}"])
    )
    print(
        f"{found.exploration}: {found.episodes} episodes, reward {found.reward_mean:.3f} ± "
        f"{found.reward_std:.3f}; |mean estimate| {found.mean_norm:.4g}, its standard error "
        f"{found.standard_error:.4g}: signal-to-noise {found.snr:.2f}; the halves' cosine "
        f"{found.split_cosine:+.2f}"
    )
    print(json.dumps(asdict(found)))
    return 0
