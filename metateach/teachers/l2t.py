"""L2T: a data filter that learns, by REINFORCE, to make its student reach a target accuracy sooner.

References:
    Fan, Tian, Qin, Li and Liu, "Learning to Teach", ICLR 2018.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.data import Batch, derive_seed
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.teacher import PolicyGradient, StudentView, Teacher, TeachingContext

__all__ = ["L2TFilter", "l2t_features", "speed_reward"]


def l2t_features(batch: Batch, view: StudentView, num_classes: int, image_stats: bool) -> Tensor:
    """Each sample's state (L2T, Section 4.1), one row per sample.

    Data: the label, one-hot (and, with ``image_stats``, the input's mean and
    standard deviation, a cheap image descriptor). Student: the normalized
    iteration, the average historical training loss and the best validation
    accuracy so far. Combined: the predicted probabilities, the loss, and the
    margin p_y - max_{k != y} p_k.
    """
    probs = view.logits.detach().float().softmax(dim=1)
    true = probs.gather(1, batch.y[:, None])
    others = probs.scatter(1, batch.y[:, None], -1.0).amax(dim=1, keepdim=True)
    history = view.context.history(probs.dtype, probs.device).expand(len(batch.y), 3)
    parts = [F.one_hot(batch.y, num_classes).to(probs.dtype)]
    if image_stats:
        flat = batch.x.detach().flatten(1).to(probs.dtype)
        parts += [flat.mean(dim=1, keepdim=True), flat.std(dim=1, keepdim=True)]
    parts += [history, probs, view.losses.detach().to(probs.dtype)[:, None], true - others]
    return torch.cat(parts, dim=1)


def speed_reward(target_step: float | None, budget: int) -> float:
    """r = -log(i_tau / T'): i_tau the step at which the student reached the target, T' the budget.

    Zero for a student that never reached it (i_tau = T'), larger the sooner it did.
    """
    reached = budget if target_step is None else min(max(target_step, 1), budget)
    return -math.log(reached / budget)


@TEACHERS.register("l2t")
class L2TFilter(Teacher):
    """Keeps each sample with a probability its policy network gives, from the sample's state.

    The policy is L2T's: a network with one tanh hidden layer and a sigmoid
    output (25-12-1 on MNIST). It draws each keep/drop decision, and the
    lesson is the mask with the decisions' log-probability. At the end of a
    run the reward is :func:`speed_reward` of when the student first reached
    ``train.target_val_acc`` (set it, with ``train.stop_at_target``, for an
    L2T episode).

    Args:
        num_classes: the task's classes (the library passes it).
        target_val_acc: tau, ``train.target_val_acc`` (the library passes it):
            L2T's setting, so it must be set.
        hidden: units of the hidden layer.
        image_stats: add the input's mean and standard deviation to the state.
        init_keep: the keep probability the untrained policy starts at.
        seed: the draws come from a generator seeded by (``seed``, episode,
            step), so a resumed run draws as before; the candidate batches
            of one refilled step continue its stream.
        greedy: keep exactly the samples whose probability is at least 1/2
            (a deployed teacher), instead of drawing.
    """

    learns = PolicyGradient(baseline_decay=0.9)

    def __init__(
        self,
        num_classes: int,
        target_val_acc: float | None,
        hidden: int = 12,
        image_stats: bool = False,
        init_keep: float = 0.5,
        seed: int = 0,
        greedy: bool = False,
    ) -> None:
        super().__init__()
        if target_val_acc is None:
            raise ValueError(
                "L2T rewards reaching train.target_val_acc sooner: set it (e.g. train.target_val_acc=0.9)"
            )
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        if not 0 < init_keep < 1:
            raise ValueError(f"init_keep must be in (0, 1), got {init_keep!r}")
        self.num_classes = num_classes
        self.image_stats = image_stats
        self.seed = seed
        self.greedy = greedy
        inputs = 2 * num_classes + 5 + (2 if image_stats else 0)
        self._draws: tuple[tuple[int, int], torch.Generator] | None = None
        self.policy = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.policy[-1].bias.fill_(math.log(init_keep / (1 - init_keep)))

    def keep_probability(self, batch: Batch, view: StudentView) -> Tensor:
        """Each sample's probability of being kept."""
        state = l2t_features(batch, view, self.num_classes, self.image_stats)
        return torch.sigmoid(self.policy(state).squeeze(1))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        p = self.keep_probability(batch, view)
        if self.greedy:
            keep = p.detach() >= 0.5
        else:
            generator = self._generator(view.context)
            keep = torch.rand(len(p), generator=generator).to(p.device) < p.detach()
        log_prob = torch.where(keep, p.clamp(min=1e-12).log(), (1 - p).clamp(min=1e-12).log())
        return Lesson(mask=keep, log_prob=log_prob.sum())

    def _generator(self, context: TeachingContext) -> torch.Generator:
        """The draws' generator: seeded anew at each step, continued within one (refilled batches)."""
        key = (context.episode, context.step)
        if self._draws is None or self._draws[0] != key:
            self._draws = key, torch.Generator().manual_seed(derive_seed(self.seed, *key))
        return self._draws[1]

    def episode_reward(
        self, history: Sequence[Mapping[str, float]], context: TeachingContext
    ) -> float:
        return speed_reward(
            history[-1].get("target/step") if history else None, context.total_steps
        )
