"""How noisy a REINFORCE teacher's gradient estimate is, at a policy held still.

L2T's teacher (Fan et al. 2018) learns from one estimate per episode: the
run's reward, less a baseline, times the run's score S (the summed gradients
of the log-probabilities of every keep/drop decision, or, exploring in the
parameters, eps / sigma^2). :func:`estimator_noise` runs ``episodes`` fresh
students under one policy (the teacher's optimizer at a learning rate of
zero, so the policy never moves), keeps each episode's reward r_i and score
S_i, and measures the estimate g_i = (r_i - b_i) S_i, b_i the mean reward of
the other episodes (a baseline that leaves the estimate unbiased):

* ``snr``: the norm of the true mean of g over the standard error of the
  N episodes' mean, se = sqrt(sum over the parameters of var(g) / N). Noise
  alone lifts |mean g| (E |mean g|^2 = |true mean|^2 + se^2), so the true
  norm is estimated as sqrt(max(|mean g|^2 - se^2, 0)): 0 when the N
  episodes show no signal at all, and below about 1 when their average's
  direction is mostly the noise's;
* ``split_cosine``: the cosine between the averages of the two halves of the
  episodes. Near 0 the halves disagree on the direction to step.

:func:`reward_along` then asks whether the mean estimate leads anywhere: the
mean reward of fresh students under the policy moved given distances along it.

``python tools/reinforce_noise.py CONFIG [key=value ...] --episodes 20
[--line-search 0.5 1 2]`` prints both statistics, with the rewards' spread,
and the rewards along the estimate.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from metateach.config import ExperimentConfig, load_config
from metateach.engine.policy_gradient import Reinforce
from metateach.trainer import Trainer

__all__ = [
    "EstimatorNoise",
    "estimator_noise",
    "frozen_episodes",
    "main",
    "estimates",
    "noise_of",
    "reward_along",
]


@dataclass(frozen=True)
class EstimatorNoise:
    """What :func:`estimator_noise` measured (see the module docstring)."""

    exploration: str
    episodes: int
    reward_mean: float
    reward_std: float
    mean_norm: float  # |mean g|
    standard_error: float  # sqrt(sum var(g) / N)
    snr: float  # sqrt(max(mean_norm^2 - standard_error^2, 0)) / standard_error
    split_cosine: float


def estimates(rewards: Sequence[float], scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each episode's estimate (r_i - b_i) S_i, b_i the other episodes' mean reward, a row each:
    their mean is the direction REINFORCE steps the policy in (uphill in reward)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    baseline = (r.sum() - r) / (len(r) - 1)  # each episode's: the others' mean reward
    return (r - baseline)[:, None] * torch.stack([x.double() for x in scores])


def noise_of(
    rewards: Sequence[float], scores: Sequence[torch.Tensor], exploration: str
) -> EstimatorNoise:
    """The statistics of the estimates from episodes' ``rewards`` and flattened ``scores``."""
    n = len(rewards)
    if n < 4:
        raise ValueError(f"need at least 4 episodes to measure the noise, got {n}")
    r = torch.tensor(rewards, dtype=torch.float64)
    g = estimates(rewards, scores)
    mean = g.mean(0)
    error = math.sqrt(float(g.var(0).sum()) / n)
    half = n // 2
    a, b = g[:half].mean(0), g[half:].mean(0)
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    signal = math.sqrt(max(float(mean.norm()) ** 2 - error**2, 0.0))
    return EstimatorNoise(
        exploration, n, float(r.mean()), float(r.std()), float(mean.norm()), error,
        signal / max(error, 1e-300), cosine,
    )  # fmt: skip


def frozen_episodes(
    cfg: ExperimentConfig, offset: torch.Tensor | None = None
) -> tuple[list[float], list[torch.Tensor], str]:
    """Run the ``train.episodes`` students of ``cfg`` under its teacher's starting policy (moved
    by the flat ``offset``, if given), held still; each episode's reward and flattened score, and
    the kind of exploration."""
    trainer = Trainer(cfg)
    strategy = trainer.teaching.strategy
    if not isinstance(strategy, Reinforce):
        raise ValueError(f"teacher '{cfg.teacher.name}' does not learn by REINFORCE")
    if offset is not None:
        with torch.no_grad():
            params = strategy.problem.teacher_params()
            for p, step in zip(params, offset.split([p.numel() for p in params]), strict=True):
                p.add_(step.view_as(p).to(p))
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
    return rewards, scores, strategy.settings.exploration


def estimator_noise(cfg: ExperimentConfig) -> EstimatorNoise:
    """Run the ``train.episodes`` students of ``cfg`` under one policy and measure its estimate's
    noise."""
    return noise_of(*frozen_episodes(cfg))


def reward_along(
    cfg: ExperimentConfig, direction: torch.Tensor, distances: Sequence[float]
) -> dict[float, tuple[float, float] | None]:
    """The mean reward (and its standard error) of ``train.episodes`` students under the
    starting policy moved ``distance`` along ``direction`` (normalized), for each distance:
    does the estimated direction lead anywhere better? None where the moved policy keeps
    no sample at all."""
    unit = direction / direction.norm().clamp(min=1e-300)
    found: dict[float, tuple[float, float] | None] = {}
    for distance in distances:
        moved = copy.deepcopy(cfg)  # a run folder of its own
        moved.train.run_name = f"{cfg.train.run_name or 'reinforce-noise'}-along-{distance:g}"
        try:
            rewards, _, _ = frozen_episodes(moved, distance * unit)
        except RuntimeError as e:  # a filter that keeps no sample at all teaches nothing
            if "kept no sample" not in str(e):
                raise
            found[distance] = None
            continue
        r = torch.tensor(rewards, dtype=torch.float64)
        found[distance] = (float(r.mean()), float(r.std()) / math.sqrt(len(r)))
    return found


def main(argv: Sequence[str] | None = None, prog: str = "reinforce_noise.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "config", help="a REINFORCE teacher's config, e.g. configs/cpu/l2t_mnist_teacher.yaml"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument(
        "--line-search",
        type=float,
        nargs="+",
        metavar="DISTANCE",
        help="then run --episodes students at the policy moved each distance along the mean "
        "estimate, and print their mean reward",
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"train.episodes={args.episodes}"])
    rewards, scores, exploration = frozen_episodes(cfg)
    found = noise_of(rewards, scores, exploration)
    print(
        f"{found.exploration}: {found.episodes} episodes, reward {found.reward_mean:.3f} ± "
        f"{found.reward_std:.3f}; |mean estimate| {found.mean_norm:.4g}, its standard error "
        f"{found.standard_error:.4g}: signal-to-noise {found.snr:.2f}; the halves' cosine "
        f"{found.split_cosine:+.2f}"
    )
    print(json.dumps(asdict(found)))
    if args.line_search:
        along = reward_along(cfg, estimates(rewards, scores).mean(0), args.line_search)
        for distance, reward in along.items():
            said = (
                "the policy keeps no sample"
                if reward is None
                else (f"reward {reward[0]:.3f} ± {reward[1]:.3f}")
            )
            print(f"  {distance:g} along the mean estimate: {said}")
        print(json.dumps({"line_search": {str(k): v for k, v in along.items()}}))
    return 0
