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

Every epoch's losses and weights of the sample are kept, with each
sample's given and true label (:class:`SampleRecord`, ``samples.npz``): the
record a data-driven MentorNet learns from.

A teacher that replaces the loss (L2T-DLN, L2T-DLF) is also drawn as its
loss against the true class's probability, at several epochs (the L2T-DLN
paper's figure of its dynamic loss network): each epoch records the loss at
the probabilities of :data:`P_TRUE`, the other classes sharing the rest
equally, as ``loss_curve/p_true=...`` metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metateach.data import Batch, DataBundle
from metateach.engine import TeachingStrategy
from metateach.lesson import Lesson, LossFn, StatesLoss, per_sample_losses
from metateach.teacher import PeerTeacher, TeachingContext

__all__ = [
    "WeightSnapshot",
    "SampleRecord",
    "TeacherDiagnostics",
    "weight_snapshot",
    "diagnostic_indices",
    "draw_diagnostics",
    "P_TRUE",
    "SNAPSHOT",
    "SAMPLES",
    "CURVE_KEYS",
    "loss_curve",
    "margins",
]

#: The file, in a run's ``diagnostics/`` folder, of the teacher's last weight snapshot.
SNAPSHOT = "snapshot.npz"
#: The file, in a run's ``diagnostics/`` folder, of its :class:`SampleRecord`.
SAMPLES = "samples.npz"
#: The true-class probabilities at which a learned loss is recorded each epoch.
P_TRUE = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: Their metric names, in the same order.
CURVE_KEYS = tuple(f"loss_curve/p_true={p:.2f}" for p in P_TRUE)


@dataclass
class WeightSnapshot:
    """A teacher's effective weight on each sample of a fixed subset, with what explains it."""

    weights: np.ndarray  # effective per-sample weight, mean 1 over the subset
    losses: np.ndarray  # cross-entropy on the given (possibly noisy) label
    targets: np.ndarray  # the given labels
    noisy: np.ndarray  # True where the given label is wrong
    features: np.ndarray  # the student's second-to-last layer
    loss_curve: np.ndarray | None = None  # a replaced loss at P_TRUE (see loss_curve)
    margins: np.ndarray | None = None  # the given label's logit minus the largest other one
    kept: np.ndarray | None = None  # False where the lesson's mask drops it (None: no mask)
    peer_kept: np.ndarray | None = None  # co-teaching: what the student selects for its peer

    def save(self, path: Path) -> Path:
        """The arrays as an ``.npz`` (what :func:`metateach.report.plots.plot_figure2` reads back)."""
        arrays = {k: v for k, v in vars(self).items() if v is not None}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> WeightSnapshot:
        with np.load(path) as arrays:
            return cls(**{k: arrays[k] for k in arrays.files})

    def summary(self) -> dict[str, float]:
        """Shares of the total weight and mean weights on clean and mislabeled samples; how
        evenly the weight is spread, and how well it tells the two apart.

        ``teacher/effective_sample_share`` is (sum w)^2 / (n sum w^2), Kish's effective
        sample size over n: 1 when every sample weighs the same, k/n when the
        weight falls evenly on k samples and none on the rest. The mean
        weights can sit at one while the weight collapses onto a few samples.
        ``teacher/clean_over_noisy_auc`` is the chance that a clean sample
        outweighs a mislabeled one (ties count half): 0.5 when the weights
        ignore the label noise, whatever their spread.
        """
        total = max(float(self.weights.sum()), 1e-12)
        square = max(float(np.square(self.weights).sum()), 1e-24)
        noisy, clean = self.weights[self.noisy], self.weights[~self.noisy]
        curve = (
            {}
            if self.loss_curve is None
            else dict(zip(CURVE_KEYS, map(float, self.loss_curve), strict=True))
        )
        return {
            "teacher/noisy_weight_share": float(noisy.sum()) / total,
            "teacher/noisy_sample_share": float(self.noisy.mean()),
            "teacher/mean_weight_clean": float(clean.mean()) if len(clean) else 0.0,
            "teacher/mean_weight_noisy": float(noisy.mean()) if len(noisy) else 0.0,
            "teacher/effective_sample_share": total**2 / (len(self.weights) * square),
            **(
                {"teacher/clean_over_noisy_auc": _auc(clean, noisy)}
                if len(clean) and len(noisy)
                else {}
            ),
            **curve,
            **self.keep_by_loss_decile(),
            **self.selection_agreement(),
        }

    def selection_agreement(self) -> dict[str, float]:
        """Co-teaching: the share of the sample on which the two networks' selections agree (both
        keep it or both drop it), and the share both keep; nothing for other teachers."""
        if self.kept is None or self.peer_kept is None:
            return {}
        return {
            "peer/selection_agreement": float((self.kept == self.peer_kept).mean()),
            "peer/selected_by_both": float((self.kept & self.peer_kept).mean()),
        }

    def keep_by_loss_decile(self) -> dict[str, float]:
        """For a teacher that masks (L2T's filter), the share of the sample it keeps in each
        tenth of the sample ordered by loss, lowest first (``lesson/keep_rate_loss_decile_01``
        ... ``_10``); nothing for one that does not."""
        if self.kept is None:
            return {}
        order = np.argsort(self.losses, kind="stable")
        return {
            f"lesson/keep_rate_loss_decile_{i + 1:02d}": float(self.kept[part].mean())
            for i, part in enumerate(np.array_split(order, 10))
            if len(part)
        }


def _auc(high: np.ndarray, low: np.ndarray) -> float:
    """The chance that a value of ``high`` exceeds one of ``low``, ties counted half (the
    Mann-Whitney statistic over the product of the counts, from average ranks)."""
    values = np.concatenate([high, low])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # from 1, ties averaged
    n = len(high)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * len(low)))


@dataclass
class SampleRecord:
    """The diagnostic sample at the end of every epoch: each sample's loss and the teacher's weight.

    Rows follow the measurements (``episode``, ``epoch`` from 1, and
    ``progress``, the fraction of the episode's steps done); columns the
    samples, whose place in the training split, given label and true label
    are kept beside. MentorNet-DD learns from this record
    (:func:`metateach.teachers.mentornet.fit_mentornet`).
    """

    index: np.ndarray  # [n] positions in the training split
    targets: np.ndarray  # [n] the given (possibly noisy) labels
    clean_targets: np.ndarray  # [n] the true labels
    episode: np.ndarray  # [E] from 0
    epoch: np.ndarray  # [E] from 1
    progress: np.ndarray  # [E] in (0, 1]
    losses: np.ndarray  # [E, n] cross-entropy on the given label, as a training step sees it
    weights: np.ndarray  # [E, n] effective weights (WeightSnapshot.weights)

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **vars(self))
        return path

    @classmethod
    def load(cls, path: Path) -> SampleRecord:
        with np.load(path) as arrays:
            return cls(**{k: arrays[k] for k in arrays.files})


def loss_curve(loss_fn: LossFn, num_classes: int, device: torch.device) -> np.ndarray:
    """A replaced loss at each probability of :data:`P_TRUE` for the true class, the rest spread evenly."""
    p = torch.tensor(P_TRUE, dtype=torch.float64)
    rest = ((1 - p) / max(num_classes - 1, 1))[:, None].expand(-1, num_classes - 1)
    logits = torch.cat([p[:, None], rest], dim=1).log().float().to(device)
    targets = torch.zeros(len(p), dtype=torch.long, device=device)
    return loss_fn(logits, targets).detach().double().cpu().numpy()


class TeacherDiagnostics:
    """A run's teacher diagnostics: a fixed sample, measured each epoch and drawn at the end.

    Args:
        strategy: the run's teaching strategy (its problem holds the student and teacher).
        data: the run's data.
        count: training samples to look at.
        seed: chooses them.
        batch_size: samples per forward pass.
    """

    def __init__(
        self, strategy: TeachingStrategy, data: DataBundle, count: int, seed: int, batch_size: int
    ) -> None:
        self.strategy = strategy
        self.data = data
        self.indices = diagnostic_indices(data, count, seed)
        self.batch_size = batch_size
        self.snapshot: WeightSnapshot | None = None
        # Each measurement's (episode, epoch, progress), losses and weights, for the SampleRecord.
        self.rows: list[tuple[int, int, float]] = []
        self.losses: list[Tensor] = []
        self.weights: list[Tensor] = []

    def measure(self, context: TeachingContext) -> dict[str, float]:
        """The teacher's weights now, kept for the record, summarized (see :meth:`WeightSnapshot.summary`)."""
        self.snapshot = weight_snapshot(
            self.strategy, self.data, self.indices, context, self.batch_size
        )
        self.rows.append((context.episode, context.epoch + 1, context.progress))
        self.losses.append(torch.from_numpy(self.snapshot.losses))
        self.weights.append(torch.from_numpy(self.snapshot.weights))
        return self.snapshot.summary()

    def record(self) -> SampleRecord:
        """Every measurement so far."""
        return SampleRecord(
            index=self.indices.numpy(),
            targets=self.data.train.targets[self.indices].numpy(),
            clean_targets=self.data.train.clean_targets[self.indices].numpy(),
            episode=np.array([r[0] for r in self.rows], dtype=np.int64),
            epoch=np.array([r[1] for r in self.rows], dtype=np.int64),
            progress=np.array([r[2] for r in self.rows], dtype=np.float64),
            losses=self._stacked(self.losses),
            weights=self._stacked(self.weights),
        )

    def _stacked(self, rows: list[Tensor]) -> np.ndarray:
        return torch.stack(rows).numpy() if rows else np.zeros((0, len(self.indices)), np.float32)

    def state_dict(self) -> dict[str, Tensor]:
        """The measurements so far, for a checkpoint: a resumed run's record loses none."""
        return {
            "rows": torch.tensor([[e, ep, p] for e, ep, p in self.rows], dtype=torch.float64),
            "losses": torch.from_numpy(self._stacked(self.losses)),
            "weights": torch.from_numpy(self._stacked(self.weights)),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.rows = [(int(e), int(ep), float(p)) for e, ep, p in state["rows"].tolist()]
        self.losses = list(state["losses"].unbind())
        self.weights = list(state["weights"].unbind())

    def save(self, context: TeachingContext, folder: Path) -> None:
        """The record (``samples.npz``) and the latest snapshot (``snapshot.npz``, for Figure 2)."""
        self.record().save(folder / SAMPLES)
        self._latest(context).save(folder / SNAPSHOT)

    def _latest(self, context: TeachingContext) -> WeightSnapshot:
        """The latest snapshot; taken now, outside the record, if there is none (a finished run, resumed)."""
        if self.snapshot is None:
            self.snapshot = weight_snapshot(
                self.strategy, self.data, self.indices, context, self.batch_size
            )
        return self.snapshot

    def draw(
        self, context: TeachingContext, history: list[dict[str, float]], title: str, folder: Path
    ) -> dict[str, Path]:
        """The figures, from the latest snapshot (taken now if there is none) and the per-epoch shares."""
        shares = [
            (int(r["trainer/epoch"]), r["teacher/noisy_weight_share"])
            for r in history
            if "teacher/noisy_weight_share" in r
        ]
        curves = [
            (int(r["trainer/epoch"]), np.array([r[k] for k in CURVE_KEYS]))
            for r in history
            if CURVE_KEYS[0] in r
        ]
        return draw_diagnostics(
            self._latest(context), shares, self.data.noise.realized_rate, title, folder, curves
        )


def diagnostic_indices(data: DataBundle, count: int, seed: int) -> Tensor:
    """A fixed random sample of training indices (at most ``count``)."""
    n = len(data.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: min(count, n)].sort().values


def weight_snapshot(
    strategy: TeachingStrategy,
    data: DataBundle,
    indices: Tensor,
    context: TeachingContext,
    batch_size: int,
) -> WeightSnapshot:
    """The teacher's lessons on the training samples ``indices``, without disturbing the run
    (:meth:`~metateach.engine.strategy.TeachingStrategy.preview`).

    A sample's effective weight is its lesson weight times its mask (1 where
    the lesson has none), times the ratio of the gradient norms (with
    respect to the logits) of the lesson's loss and of cross-entropy when
    the lesson replaces the loss: how much the sample counts in the
    student's step, relative to plain training.
    """
    problem = strategy.problem
    teacher = problem.teacher
    assert teacher is not None
    device = problem.device
    parts: dict[str, list[Tensor]] = {
        k: [] for k in ("weights", "losses", "features", "margins", "kept", "peer_kept")
    }
    curve, masked = None, False
    # A teacher's buffers (MentorNet-PD's running threshold) are put back after; its
    # parameters it does not change, and they may sit in a live graph (L2T-DLN's).
    buffers = {name: b.clone() for name, b in teacher.named_buffers()}
    with problem.own_rng():
        for start in range(0, len(indices), batch_size):
            index = indices[start : start + batch_size]
            batch = Batch(
                data.normalize(data.train.images[index].to(device)),
                data.train.targets[index].to(device),
                index.to(device),
            )
            view, lesson = strategy.preview(batch, context)
            with torch.no_grad():
                weights = torch.ones_like(view.losses)
                kept = torch.ones_like(view.losses, dtype=torch.bool)
                if lesson is not None:
                    if lesson.weights is not None:
                        weights = weights * lesson.weights.detach()
                    if lesson.mask is not None:
                        weights = weights * lesson.mask.to(weights.dtype)
                        kept, masked = lesson.mask.bool(), True
                    # A loss of the states is not a function of the logits alone.
                    if lesson.loss_fn is not None and not isinstance(lesson.loss_fn, StatesLoss):
                        weights = weights * _gradient_ratio(lesson, view.logits.detach(), batch.y)
                        if curve is None:
                            curve = loss_curve(lesson.loss_fn, data.num_classes, device)
            parts["weights"].append(weights.float().cpu())
            parts["losses"].append(view.losses.detach().float().cpu())
            parts["features"].append(view.features.detach().float().flatten(1).cpu())
            parts["margins"].append(margins(view.logits.detach(), batch.y).float().cpu())
            parts["kept"].append(kept.cpu())
            if isinstance(teacher, PeerTeacher):  # the other direction of the exchange
                parts["peer_kept"].append(teacher.select(view.losses.detach(), context).cpu())
    with torch.no_grad():
        for name, value in teacher.named_buffers():
            value.copy_(buffers[name])
    weights = torch.cat(parts["weights"])
    weights = weights / weights.mean().clamp(min=1e-12)
    return WeightSnapshot(
        weights=weights.numpy(),
        losses=torch.cat(parts["losses"]).numpy(),
        targets=data.train.targets[indices].numpy(),
        noisy=data.train.is_noisy[indices].numpy(),
        features=torch.cat(parts["features"]).numpy(),
        loss_curve=curve,
        margins=torch.cat(parts["margins"]).numpy(),
        kept=torch.cat(parts["kept"]).numpy() if masked else None,
        peer_kept=torch.cat(parts["peer_kept"]).numpy() if parts["peer_kept"] else None,
    )


def margins(logits: Tensor, targets: Tensor) -> Tensor:
    """Each sample's logit of ``targets`` minus its largest other logit (negative: misclassified)."""
    given = logits.gather(1, targets[:, None]).squeeze(1)
    others = logits.scatter(1, targets[:, None], float("-inf"))
    return given - others.max(dim=1).values


@torch.enable_grad()
def _gradient_ratio(lesson: Lesson, logits: Tensor, targets: Tensor) -> Tensor:
    """|d loss_fn / d logits| / |d cross-entropy / d logits| per sample: how much a replaced loss weighs it."""
    logits = logits.detach().requires_grad_()
    replaced = per_sample_losses(lesson, logits, targets)
    (by_lesson,) = torch.autograd.grad(replaced.sum(), logits)
    by_ce = logits.detach().softmax(dim=1) - F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return by_lesson.norm(dim=1) / by_ce.norm(dim=1).clamp(min=1e-12)


def draw_diagnostics(
    snapshot: WeightSnapshot,
    shares: list[tuple[int, float]],
    noise_rate: float,
    title: str,
    folder: Path,
    loss_curves: Sequence[tuple[int, np.ndarray]] = (),
) -> dict[str, Path]:
    """Figure 2's panels, the weight-share curve and any learned loss as PNGs in ``folder``.

    Returns name -> path.
    """
    from metateach.report.plots import (
        plot_loss_curves,
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
    if loss_curves:
        paths["loss_curve"] = plot_loss_curves(
            P_TRUE, loss_curves, title, folder / "loss_curve.png"
        )
    return paths
