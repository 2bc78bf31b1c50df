"""MentorNet: each sample's weight from its loss, against a running percentile of the losses.

Two kinds, as in the paper:

* MentorNet-PD (``mentornet_pd``), a predefined curriculum;
* MentorNet-DD (``mentornet_dd``), a curriculum learned from data: a small
  network fitted to tell, from a sample's loss, its distance to the
  percentile and the point of training, whether its label is right, on a
  record of a student's training where the true labels are known
  (:class:`~metateach.report.diagnostics.SampleRecord`, :func:`fit_mentornet`).

References:
    Jiang, Zhou, Leung, Li and Fei-Fei, "MentorNet: Learning data-driven
    curriculum for very deep neural networks on corrupted labels", ICML 2018;
    the baseline of Tables 5 and 6 in Fan et al. (2020). The settings are
    those of the authors' CIFAR runs (their ``commands/`` and ``code/``):
    MentorNet-PD as ``mentornet_pd1_g_1`` (percentile 0.75, gamma 1, example
    dropout 0.5 for the first 17% of training and 0.05 after, no burn-in
    beyond the curriculum's); MentorNet-DD as ``mentornet_dd1`` (a burn-in of
    18% with every weight 1, the epoch feature held at 18 after it, example
    dropout 0.5, 0.05 and 0.9 over 17%, 78% and 5% of training, the
    percentile 0.8, 0.6 or 0.5 for 20%, 40% or 80% noise), its network fitted
    as theirs is (Adam at 0.1 decayed by 0.9 every 1,000 steps, gradient norm
    clipped at 5, batches of 32, 30,000 steps, on the loss, its distance to
    the record's 90th percentile and the epoch in percent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.report.diagnostics import SAMPLES, SampleRecord
from metateach.teacher import FixedRule, StudentView, Teacher

__all__ = [
    "MentorNetPD",
    "MentorNetDD",
    "MentorNetwork",
    "fit_mentornet",
    "load_record",
    "main",
    "predefined_curriculum",
]


def predefined_curriculum(
    losses: Tensor, threshold: Tensor, progress: float, gamma: float = 1.0
) -> Tensor:
    """MentorNet-PD's target weights v*(loss, loss - lambda, epoch).

    Over the first 18% of training every sample counts (v = 1); until 90%,
    self-paced learning keeps the samples whose loss is at most the
    threshold lambda (v = 1[loss <= lambda]); after that, the linear
    self-paced curriculum v = clip(1 - (loss - lambda) / gamma, 0, 1)
    admits harder samples in part. ``progress`` is the fraction of training
    done; the curriculum reads it in whole percent, as MentorNet's epoch
    feature does.
    """
    percent = int(100 * progress)
    if percent <= 18:
        return torch.ones_like(losses)
    diff = losses - threshold
    if percent < 90:
        return (diff <= 0).to(losses.dtype)
    return (1 - diff / gamma).clamp(0, 1)


class _Mentor(Teacher):
    """What both MentorNets share: the threshold lambda, a running percentile of the batch
    losses, and example dropout.

    lambda is an exponential moving average (``decay``) of the
    ``percentile``-th percentile of each training batch's losses, started at
    0 as the authors' code starts it. Example dropout (Liang et al. 2016, as
    MentorNet applies it) zeroes the weights of a random share of the batch:
    ``dropout`` is a list of ``[rate, fraction of training]`` pieces, in
    order, whose fractions add up to 1. The weights are not normalized: the
    student minimizes mean(v * loss), as in MentorNet's objective.
    """

    learns = FixedRule()

    def __init__(self, percentile: float, decay: float, dropout: Sequence[Sequence[float]]) -> None:
        super().__init__()
        if not 0 < percentile <= 1:
            raise ValueError(f"percentile must be in (0, 1], got {percentile}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        pieces = [tuple(piece) for piece in dropout]
        if (
            not pieces
            or any(len(p) != 2 or not 0 <= p[0] < 1 or not p[1] > 0 for p in pieces)
            or abs(sum(p[1] for p in pieces) - 1) > 1e-6
        ):
            raise ValueError(
                "dropout must be [[rate, fraction], ...] with rates in [0, 1) and fractions > 0 "
                f"adding up to 1, got {[list(p) for p in pieces]}"
            )
        self.percentile = percentile
        self.decay = decay
        self.dropout = pieces
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def dropout_rate(self, progress: float) -> float:
        """The share of each batch whose weights example dropout zeroes at this point of training."""
        end = 0.0
        for rate, fraction in self.dropout:
            end += fraction
            if progress < end:
                return rate
        return self.dropout[-1][0]

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        losses = view.losses.detach()
        with torch.no_grad():
            quantile = torch.quantile(losses.double(), self.percentile)
            self.threshold.mul_(self.decay).add_((1 - self.decay) * quantile)
            progress = view.context.progress
            weights = self.curriculum(losses, self.threshold.to(losses.dtype), progress)
            n = len(losses)
            kept = int(n * (1 - self.dropout_rate(progress)))
            dropped = torch.randperm(n, device=losses.device)[kept:]
            weights[dropped] = 0
        return Lesson(weights=weights)

    def curriculum(self, losses: Tensor, threshold: Tensor, progress: float) -> Tensor:
        """The weight v of each sample, before example dropout."""
        raise NotImplementedError


@TEACHERS.register("mentornet_pd")
class MentorNetPD(_Mentor):
    """Weights from the predefined curriculum (:func:`predefined_curriculum`), with example dropout.

    MentorNet-PD is a network trained beforehand to reproduce this
    curriculum from (loss, loss - lambda, label, epoch); this teacher applies
    the curriculum it reproduces, exactly, so no fitting error enters.
    Lambda and example dropout are :class:`_Mentor`'s.

    Args:
        percentile: the loss percentile behind lambda, in (0, 1].
        gamma: the width of the linear curriculum's ramp, > 0.
        decay: lambda's moving-average decay, in [0, 1).
        dropout: ``[[rate, fraction], ...]``; rates in [0, 1).
    """

    def __init__(
        self,
        percentile: float = 0.75,
        gamma: float = 1.0,
        decay: float = 0.9,
        dropout: Sequence[Sequence[float]] = ((0.5, 0.17), (0.05, 0.83)),
    ) -> None:
        super().__init__(percentile, decay, dropout)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.gamma = gamma

    def curriculum(self, losses: Tensor, threshold: Tensor, progress: float) -> Tensor:
        return predefined_curriculum(losses, threshold, progress, self.gamma)


class MentorNetwork(nn.Module):
    """The authors' MentorNet network (``mentornet_nn``): a logit for "this label is right".

    The loss and its difference to lambda go through a forward and a
    backward LSTM cell of one unit over a sequence of one step (their cell
    states are the features); the label through a trained embedding of 2
    (the authors feed label 0 to every sample); the epoch in percent (0-99)
    through a fixed random embedding of 5. All concatenated, then a layer
    of 20 with tanh and one output.
    """

    def __init__(self, label_dim: int = 2, epoch_dim: int = 5, hidden: int = 20) -> None:
        super().__init__()
        self.forward_cell = nn.LSTMCell(2, 1)
        self.backward_cell = nn.LSTMCell(2, 1)
        self.label_embedding = nn.Embedding(2, label_dim)
        bound = math.sqrt(
            6 / (100 + epoch_dim)
        )  # Glorot uniform, TensorFlow's default; not trained
        self.register_buffer("epoch_embedding", (2 * torch.rand(100, epoch_dim) - 1) * bound)
        self.hidden = nn.Linear(label_dim + epoch_dim + 2, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, losses: Tensor, diffs: Tensor, labels: Tensor, epochs: Tensor) -> Tensor:
        pair = torch.stack([losses, diffs], dim=1)
        _, forward_state = self.forward_cell(pair)
        _, backward_state = self.backward_cell(pair)
        features = torch.cat(
            [
                self.label_embedding(labels),
                self.epoch_embedding[epochs.clamp(0, 99)],
                forward_state,
                backward_state,
            ],
            dim=1,
        )
        return self.out(torch.tanh(self.hidden(features))).squeeze(1)


def load_record(path: str | Path) -> SampleRecord:
    """The sample record of a run folder (its ``diagnostics/samples.npz``), or of that file."""
    path = Path(path)
    file = path / "diagnostics" / SAMPLES if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"no sample record at {file}: a run with a teacher writes diagnostics/{SAMPLES} "
            "when it ends (logging.diagnostics: true)"
        )
    record = SampleRecord.load(file)
    if len(record.epoch) == 0:
        raise ValueError(f"the sample record {file} holds no epoch")
    return record


def fit_mentornet(
    record: SampleRecord,
    percentile: float = 0.9,
    steps: int = 30_000,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[MentorNetwork, dict[str, float]]:
    """MentorNet-DD's network, fitted as the authors fit it, and how well it fits.

    Every (sample, epoch) of ``record`` is an example: features the loss,
    its difference to the record's ``percentile``-th loss percentile, label
    0 and the epoch in percent; target 1 where the given label is the true
    one. Binary cross-entropy, Adam at ``lr`` decayed by 0.9 every 1,000
    steps, the gradient norm clipped at 5, random batches; 20% of the
    examples are held out. The global random state is left as it was.

    Returns the network (in eval mode) and ``{"examples", "clean_share",
    "held_out_bce", "held_out_accuracy", "threshold"}``.
    """
    losses = torch.from_numpy(record.losses.astype(np.float32)).reshape(-1)
    n = record.losses.shape[1]
    epochs = torch.from_numpy(np.minimum((record.progress * 100).astype(np.int64), 99))
    epochs = epochs.repeat_interleave(n)
    right = (
        torch.from_numpy(record.targets == record.clean_targets).float().repeat(len(record.epoch))
    )
    threshold = float(torch.quantile(losses.double(), percentile))
    diffs = losses - threshold
    labels = torch.zeros_like(epochs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = MentorNetwork()
        order = torch.randperm(len(losses))
        held, train = order[: len(order) // 5], order[len(order) // 5 :]
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=0.9)
        for _ in range(steps):
            pick = train[torch.randint(len(train), (batch_size,))]
            logits = network(losses[pick], diffs[pick], labels[pick], epochs[pick])
            loss = F.binary_cross_entropy_with_logits(logits, right[pick])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(network.parameters(), 5.0)
            optimizer.step()
            schedule.step()
    network.eval()
    with torch.no_grad():
        logits = network(losses[held], diffs[held], labels[held], epochs[held])
        bce = F.binary_cross_entropy_with_logits(logits, right[held])
        accuracy = ((logits > 0).float() == right[held]).float().mean()
    report = {
        "examples": float(len(losses)),
        "clean_share": float(right.mean()),
        "held_out_bce": float(bce),
        "held_out_accuracy": float(accuracy),
        "threshold": threshold,
    }
    return network, report


#: What :func:`fit_mentornet` reports, in the order :class:`MentorNetDD` keeps it.
FIT_REPORT = ("examples", "clean_share", "held_out_bce", "held_out_accuracy", "threshold")

#: The authors' use-time percentile by noise rate (up to the key): 0.8 for 20%, 0.6 for 40%,
#: 0.5 beyond.
DD_PERCENTILES = ((0.2, 0.8), (0.4, 0.6), (1.0, 0.5))


@TEACHERS.register("mentornet_dd")
class MentorNetDD(_Mentor):
    """Weights from a MentorNet network fitted to a record of training with known labels.

    The network is fitted (:func:`fit_mentornet`, seeded, the run's random
    state untouched) on ``record``: a run folder whose diagnostics wrote
    ``diagnostics/samples.npz``, or that file. The record is read at
    construction; the fit happens when the network is first needed, unless a
    checkpoint brought the fitted network (a resumed run does not refit).
    How well it fits is among the run's metrics (:meth:`metrics`). In the
    run, v = sigmoid(network(loss, loss - lambda, 0, epoch)), with every v
    1 during the burn-in and the epoch feature held at the burn-in's end
    after it; then example dropout. Lambda and example dropout are
    :class:`_Mentor`'s.

    Args:
        record: where the network learns from (see above).
        percentile: the loss percentile behind lambda; by default the
            authors' for the noise rate (:data:`DD_PERCENTILES`).
        decay: lambda's moving-average decay, in [0, 1).
        burn_in: the share of training, in [0, 1), whose weights are all 1.
        dropout: ``[[rate, fraction], ...]``; rates in [0, 1).
        fit: :func:`fit_mentornet`'s settings (``percentile``, ``steps``,
            ``batch_size``, ``lr``, ``seed``).
        noise_rate: the configured noise rate (``noise.rate``), which picks
            the default percentile.
    """

    def __init__(
        self,
        record: str,
        percentile: float | None = None,
        decay: float = 0.9,
        burn_in: float = 0.18,
        dropout: Sequence[Sequence[float]] = ((0.5, 0.17), (0.05, 0.78), (0.9, 0.05)),
        fit: dict[str, Any] | None = None,
        noise_rate: float = 0.0,
    ) -> None:
        if percentile is None:
            percentile = next(p for rate, p in DD_PERCENTILES if noise_rate <= rate)
        super().__init__(percentile, decay, dropout)
        if not 0 <= burn_in < 1:
            raise ValueError(f"burn_in must be in [0, 1), got {burn_in}")
        self.burn_in = int(100 * burn_in)
        settings = dict(fit or {})
        unknown = sorted(set(settings) - {"percentile", "steps", "batch_size", "lr", "seed"})
        if unknown:
            raise ValueError(
                f"fit has no setting {unknown[0]!r} (valid: percentile, steps, batch_size, lr, seed)"
            )
        self.record = load_record(record)
        self.fit_settings = settings
        with torch.random.fork_rng(devices=[]):  # its weights are the fit's or a checkpoint's
            self.network = MentorNetwork().requires_grad_(False).eval()
        self.register_buffer(
            "fit_report", torch.full((len(FIT_REPORT),), math.nan, dtype=torch.float64)
        )
        self.register_load_state_dict_post_hook(lambda module, _: module._note_fit())
        self._note_fit()

    def _note_fit(self) -> None:
        self.fitted = not bool(self.fit_report.isnan().any())

    def fit(self) -> None:
        """Fit the network on the record (:func:`fit_mentornet`)."""
        with torch.enable_grad():  # the lesson is formed without
            network, report = fit_mentornet(self.record, **self.fit_settings)
        self.network.load_state_dict(network.state_dict())
        self.fit_report.copy_(
            torch.tensor([report[key] for key in FIT_REPORT], dtype=torch.float64)
        )
        self._note_fit()

    def metrics(self) -> dict[str, float]:
        """:func:`fit_mentornet`'s report, once the network is fitted."""
        if not self.fitted:
            return {}
        return {
            f"mentor_fit/{key}": value
            for key, value in zip(FIT_REPORT, self.fit_report.tolist(), strict=True)
        }

    def curriculum(self, losses: Tensor, threshold: Tensor, progress: float) -> Tensor:
        epoch = min(int(100 * progress), 99, self.burn_in)  # held after the burn-in
        if epoch < self.burn_in - 1:
            return torch.ones_like(losses)
        if not self.fitted:
            self.fit()
        epochs = torch.full_like(losses, epoch, dtype=torch.long)
        logits = self.network(
            losses.float(), (losses - threshold).float(), torch.zeros_like(epochs), epochs
        )
        return torch.sigmoid(logits).to(losses.dtype)


def main(argv: Sequence[str] | None = None, prog: str = "fit_mentornet.py") -> int:
    """``python tools/fit_mentornet.py RUN [--percentile P] [--steps N] [--seed S]``: fit
    MentorNet-DD's network on a run's sample record, print how well it fits, draw what it learned."""
    import argparse
    import json

    from metateach.report.plots import plot_mentor_curriculum

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__.split(":")[0])
    parser.add_argument("record", help="a run folder (its diagnostics/samples.npz) or that file")
    parser.add_argument("--percentile", type=float, default=0.9, help="of the losses (default 0.9)")
    parser.add_argument("--steps", type=int, default=30_000, help="default 30000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the figure (default: mentornet_dd.png beside the record)")
    args = parser.parse_args(argv)
    try:
        record = load_record(args.record)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    network, report = fit_mentornet(
        record, percentile=args.percentile, steps=args.steps, seed=args.seed
    )
    print(json.dumps(report, indent=2))
    losses = record.losses.reshape(-1)
    right = np.tile(record.targets == record.clean_targets, len(record.epoch))
    x = torch.from_numpy(np.geomspace(1e-3, max(float(losses.max()), 1e-2), 200).astype(np.float32))
    curves = {}
    with torch.no_grad():
        for q in (0.25, 0.5, 0.75, 0.9):
            lam = float(np.quantile(losses, q))
            epochs = torch.full((len(x),), 18, dtype=torch.long)
            v = torch.sigmoid(network(x, x - lam, torch.zeros_like(epochs), epochs))
            curves[f"epoch 18%, lambda = {q:.0%} percentile ({lam:.2f})"] = (x.numpy(), v.numpy())
    folder = Path(args.record) if Path(args.record).is_dir() else Path(args.record).parent
    out = Path(args.out) if args.out else folder / "mentornet_dd.png"
    plot_mentor_curriculum(losses, right, curves, str(args.record), out)
    print(f"figure: {out}")
    return 0
