"""What a teacher does to the training data, measured and drawn.

:func:`weight_snapshot` asks the teacher for its lessons on a fixed sample
of the training split, as a training step would (training-mode forward
passes on scratch BatchNorm buffers, a forked random stream: the run itself
is untouched). From a snapshot come the per-epoch shares of weight on clean
and mislabeled samples, and the deep-interaction paper's Figure 2:

* the weight of each sample against its training loss, coloured by class;
* a t-SNE of the student's internal states (its second-to-last layer),
  coloured by class, and the same coloured by weight;
* a histogram of the weights, clean and mislabeled samples apart;
* the share of the total weight on mislabeled samples, epoch by epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metateach.data import Batch, DataBundle
from metateach.hypergrad import BilevelProblem, example_gradient
from metateach.hypergrad.functional import scratch_buffers, student_forward
from metateach.lesson import per_sample_losses
from metateach.teacher import TeachingContext

__all__ = [
    "WeightSnapshot",
    "TeacherDiagnostics",
    "weight_snapshot",
    "diagnostic_indices",
    "draw_diagnostics",
]


@dataclass
class WeightSnapshot:
    """A teacher's effective weight on each sample of a fixed subset, with what explains it."""

    weights: np.ndarray  # effective per-sample weight, mean 1 over the subset
    losses: np.ndarray  # cross-entropy on the given (possibly noisy) label
    targets: np.ndarray  # the given labels
    noisy: np.ndarray  # True where the given label is wrong
    features: np.ndarray  # the student's second-to-last layer

    def summary(self) -> dict[str, float]:
        """Shares of the total weight and mean weights on clean and mislabeled samples."""
        total = max(float(self.weights.sum()), 1e-12)
        noisy, clean = self.weights[self.noisy], self.weights[~self.noisy]
        return {
            "teacher/noisy_weight_share": float(noisy.sum()) / total,
            "teacher/noisy_sample_share": float(self.noisy.mean()),
            "teacher/mean_weight_clean": float(clean.mean()) if len(clean) else 0.0,
            "teacher/mean_weight_noisy": float(noisy.mean()) if len(noisy) else 0.0,
        }


class TeacherDiagnostics:
    """A run's teacher diagnostics: a fixed sample, measured each epoch and drawn at the end.

    Args:
        problem: the run's bilevel problem (student and teacher).
        data: the run's data.
        count: training samples to look at.
        seed: chooses them.
        batch_size: samples per forward pass.
    """

    def __init__(
        self, problem: BilevelProblem, data: DataBundle, count: int, seed: int, batch_size: int
    ) -> None:
        self.problem = problem
        self.data = data
        self.indices = diagnostic_indices(data, count, seed)
        self.batch_size = batch_size
        self.snapshot: WeightSnapshot | None = None

    def measure(self, context: TeachingContext) -> dict[str, float]:
        """The teacher's weights now, summarized (see :meth:`WeightSnapshot.summary`)."""
        self.snapshot = weight_snapshot(
            self.problem, self.data, self.indices, context, self.batch_size
        )
        return self.snapshot.summary()

    def draw(
        self, context: TeachingContext, history: list[dict[str, float]], title: str, folder: Path
    ) -> dict[str, Path]:
        """The figures, from the latest snapshot (taken now if there is none) and the per-epoch shares."""
        if self.snapshot is None:  # a finished run, resumed
            self.measure(context)
        assert self.snapshot is not None
        shares = [
            (int(r["epoch"]), r["teacher/noisy_weight_share"])
            for r in history
            if "teacher/noisy_weight_share" in r
        ]
        return draw_diagnostics(self.snapshot, shares, self.data.noise.realized_rate, title, folder)


def diagnostic_indices(data: DataBundle, count: int, seed: int) -> Tensor:
    """A fixed random sample of training indices (at most ``count``)."""
    n = len(data.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: min(count, n)].sort().values


def weight_snapshot(
    problem: BilevelProblem,
    data: DataBundle,
    indices: Tensor,
    context: TeachingContext,
    batch_size: int,
) -> WeightSnapshot:
    """The teacher's lessons on the training samples ``indices``, without disturbing the run.

    A sample's effective weight is its lesson weight times its mask (1 where
    the lesson has none), times loss_fn / cross-entropy when the lesson
    replaces the loss: how much the sample counts in the student's step,
    relative to plain training.
    """
    student, teacher = problem.student, problem.teacher
    assert teacher is not None
    device = problem.device
    val_batch = problem.val_stream.loader.batch_at(0, 0) if problem.val_stream is not None else None
    parts: dict[str, list[Tensor]] = {k: [] for k in ("weights", "losses", "features")}
    with problem.own_rng():
        for start in range(0, len(indices), batch_size):
            index = indices[start : start + batch_size]
            batch = Batch(
                data.normalize(data.train.images[index].to(device)),
                data.train.targets[index].to(device),
                index.to(device),
            )
            params = problem.params()
            with torch.enable_grad():
                states = student_forward(student, params, batch.x, scratch_buffers(student))
                view = problem.view(states, batch, context)
                if val_batch is not None and _needs_example_grad(problem):
                    grad = example_gradient(problem, states.logits, batch, val_batch)
                    view = view._replace(example_grad=grad.detach())
            with torch.no_grad():
                lesson = teacher(batch, view)
                weights = torch.ones_like(view.losses)
                if lesson is not None:
                    if lesson.weights is not None:
                        weights = weights * lesson.weights.detach()
                    if lesson.mask is not None:
                        weights = weights * lesson.mask.to(weights.dtype)
                    if lesson.loss_fn is not None:
                        replaced = per_sample_losses(lesson, view.logits.detach(), batch.y)
                        weights = weights * replaced / view.losses.clamp(min=1e-12)
            parts["weights"].append(weights.float().cpu())
            parts["losses"].append(view.losses.detach().float().cpu())
            parts["features"].append(view.features.detach().float().flatten(1).cpu())
    weights = torch.cat(parts["weights"])
    weights = weights / weights.mean().clamp(min=1e-12)
    return WeightSnapshot(
        weights=weights.numpy(),
        losses=torch.cat(parts["losses"]).numpy(),
        targets=data.train.targets[indices].numpy(),
        noisy=data.train.is_noisy[indices].numpy(),
        features=torch.cat(parts["features"]).numpy(),
    )


def _needs_example_grad(problem: BilevelProblem) -> bool:
    from metateach.teacher import ExampleGradient

    return isinstance(getattr(problem.teacher, "learns", None), ExampleGradient)


def draw_diagnostics(
    snapshot: WeightSnapshot,
    shares: list[tuple[int, float]],
    noise_rate: float,
    title: str,
    folder: Path,
) -> dict[str, Path]:
    """Figure 2's panels and the weight-share curve as PNGs in ``folder``; returns name -> path."""
    from metateach.plots import (
        plot_noisy_weight_share,
        plot_tsne,
        plot_weight_histogram,
        plot_weight_vs_loss,
    )

    paths = {
        "weight_vs_loss": plot_weight_vs_loss(snapshot, title, folder / "weight_vs_loss.png"),
        "weight_histogram": plot_weight_histogram(snapshot, title, folder / "weight_histogram.png"),
        "tsne": plot_tsne(snapshot, title, folder / "tsne.png"),
    }
    if shares:
        paths["noisy_weight_share"] = plot_noisy_weight_share(
            shares, noise_rate, title, folder / "noisy_weight_share.png"
        )
    return paths
