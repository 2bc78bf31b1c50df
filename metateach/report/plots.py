"""Figures a researcher would rather look at than read, saved as PNGs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

if TYPE_CHECKING:
    from metateach.lab.drift import DriftRecord
    from metateach.progress import TrainState
    from metateach.report.diagnostics import WeightSnapshot

__all__ = [
    "save_figure",
    "plot_run",
    "plot_transition_matrix",
    "plot_training_curves",
    "plot_weight_vs_loss",
    "plot_tsne",
    "plot_figure2",
    "plot_weight_histogram",
    "plot_noisy_weight_share",
    "plot_mentor_curriculum",
    "plot_loss_curves",
    "plot_step_settings",
    "plot_weight_drift",
]


def plot_run(state: TrainState, target: float | None, title: str, folder: Path) -> dict[str, Path]:
    """A run's figures in ``folder``, by name: its curves, accuracy against samples, and episodes."""
    figures = {
        "curves": plot_training_curves(state.history, title, folder / "curves.png"),
        "accuracy_vs_samples": plot_accuracy_vs_samples(
            state.evals, target, title, folder / "accuracy_vs_samples.png"
        ),
    }
    if len(state.episodes) > 1:
        figures["episodes"] = plot_episodes(state.episodes, title, folder / "episodes.png")
    if state.history and any(k.startswith(STEP_SETTING_KEYS) for k in state.history[-1]):
        figures["step_settings"] = plot_step_settings(
            state.history, title, folder / "step_settings.png"
        )
    return figures


#: The epoch records of a teacher of the optimizer's step (``lr_schedule``, ``weight_decay``,
#: and the factor the steps took, which ``lr_controller`` sets too).
STEP_SETTING_KEYS = ("teacher/lr_scale/knot_", "teacher/weight_decay/", "train/lr_scale")


def plot_step_settings(
    history: Sequence[Mapping[str, float]], title: str, path: str | Path
) -> Path:
    """What a teacher of the optimizer's step learned: the learning-rate curve as it stood at the
    end of each epoch (the last drawn darkest), the scale the steps took (each epoch's mean),
    and each group's weight decay against the epoch."""
    last = history[-1]
    knots = sorted(k for k in last if k.startswith(STEP_SETTING_KEYS[0]))
    decays = sorted(k for k in last if k.startswith(STEP_SETTING_KEYS[1]))
    taken = [STEP_SETTING_KEYS[2]] if STEP_SETTING_KEYS[2] in last else []
    panels = [p for p in (knots, taken, decays) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False,
                             constrained_layout=True)  # fmt: skip
    axes = list(axes[0])
    if knots:
        ax = axes.pop(0)
        where = np.linspace(0, 1, len(knots))
        rows = [r for r in history if knots[0] in r]
        for i, r in enumerate(rows):
            shade = 0.25 + 0.75 * (i + 1) / len(rows)
            label = f"after epoch {int(r['trainer/epoch'])}" if i in (0, len(rows) - 1) else None
            ax.plot(
                where, [r[k] for k in knots], "-o", color=plt.cm.Blues(shade), ms=3, label=label
            )
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="the configured schedule")
        ax.set(xlabel="progress of the run (step / total steps)", ylabel="learning-rate scale",
               title="learned learning-rate curve", yscale="log")  # fmt: skip
        ax.legend()
    if taken:
        ax = axes.pop(0)
        rows = [r for r in history if taken[0] in r]
        ax.plot([r["trainer/epoch"] for r in rows], [r[taken[0]] for r in rows], "-o", ms=3)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="the configured schedule")
        ax.set(xlabel="epoch", ylabel="learning-rate scale (the epoch's mean)",
               title="the scale the steps took", yscale="log")  # fmt: skip
        ax.legend()
    if decays:
        ax = axes.pop(0)
        epochs = [r["trainer/epoch"] for r in history if decays[0] in r]
        for k in decays:
            ax.plot(epochs, [r[k] for r in history if k in r], "-", label=k.split("/", 2)[2])
        ax.set(xlabel="epoch", ylabel="weight decay", title="learned weight decay", yscale="log")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_transition_matrix(
    empirical: Tensor, promised: Tensor, classes: Sequence[str], title: str, path: str | Path
) -> Path:
    """Side-by-side heat maps of the promised and the realized label transition matrices."""
    n = empirical.shape[0]
    size = min(12.0, 3.0 + 0.45 * n)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size, size), constrained_layout=True)
    for ax, matrix, name in ((axes[0], promised, "promised"), (axes[1], empirical, "realized")):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{name} P(noisy label | clean label)")
        ax.set_xlabel("noisy label")
        ax.set_ylabel("clean label")
        if n <= 20:
            labels = list(classes) if len(classes) == n else [str(i) for i in range(n)]
            ax.set_xticks(range(n), labels, rotation=90)
            ax.set_yticks(range(n), labels)
            for i in range(n):
                for j in range(n):
                    value = float(matrix[i, j])
                    if value >= 0.005:
                        ax.text(
                            j,
                            i,
                            f"{value:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="black" if value > 0.6 else "white",
                        )
    fig.colorbar(image, ax=axes, shrink=0.8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_training_curves(
    history: Sequence[Mapping[str, float]], title: str, path: str | Path
) -> Path:
    """Loss and accuracy per epoch for the training, validation and test splits.

    With a peer student (co-teaching, SRIT), the accuracy panel adds the
    peer's and the ensemble's test accuracy, and a third panel the label
    precision of both networks' selections and the keep ratio.
    """
    epochs = [r["trainer/epoch"] for r in history]
    peer = "peer/label_precision_student" in history[0]
    fig, axes = plt.subplots(1, 3 if peer else 2, figsize=(16 if peer else 11, 4),
                             constrained_layout=True)  # fmt: skip
    loss_ax, acc_ax = axes[:2]

    def curve(ax: plt.Axes, key: str, style: str, label: str, scale: float = 100) -> None:
        if key in history[0]:
            ax.plot(epochs, [scale * r[key] for r in history], style, label=label)

    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        curve(loss_ax, f"{split}/loss", style, split, scale=1)
        curve(acc_ax, f"{split}/acc", style, split)
    curve(acc_ax, "train/clean_acc", "-.", "train (clean labels)")
    curve(acc_ax, "peer/test_acc", ":", "test (peer)")
    curve(acc_ax, "ensemble/test_acc", ":", "test (ensemble)")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    if peer:
        curve(axes[2], "peer/label_precision_student", "-", "student's selection")
        curve(axes[2], "peer/label_precision_peer", "--", "peer's selection")
        curve(axes[2], "peer/keep_ratio", ":", "keep ratio R(T)")
        axes[2].set(xlabel="epoch", ylabel="%", title="clean share of the selected samples")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_accuracy_vs_samples(
    evals: Sequence[Sequence[float]], target: float | None, title: str, path: str | Path
) -> Path:
    """Validation accuracy against the training samples learned from (L2T's Figure 2).

    ``evals`` holds [step, samples, accuracy] rows; ``target`` draws tau and
    marks where the run first reached it.
    """
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    samples = [row[1] for row in evals]
    accuracy = [100 * row[2] for row in evals]
    ax.plot(samples, accuracy, ".-", label="validation")
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", label=f"target {100 * target:g}%")
        reached = next((row for row in evals if row[2] >= target), None)
        if reached is not None:
            ax.plot([reached[1]], [100 * reached[2]], "o", color="red",
                    label=f"reached after {int(reached[1]):,} samples")  # fmt: skip
    ax.set(xlabel="training samples learned from", ylabel="accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_episodes(records: Sequence[Mapping[str, float]], title: str, path: str | Path) -> Path:
    """A teacher trained over episodes: its reward, and how soon each student reached the target."""
    episodes = [r["trainer/episode"] for r in records]
    fig, (reward_ax, steps_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for key, style, label in (
        ("teacher/reward", ".-", "reward"),
        ("teacher/baseline", "--", "baseline"),
    ):
        if key in records[0]:
            reward_ax.plot(episodes, [r[key] for r in records], style, label=label)
    steps_ax.plot(episodes, [r["episode/steps"] for r in records], ".-", label="steps trained")
    reached = [
        (r["trainer/episode"], r["episode/target_step"])
        for r in records
        if "episode/target_step" in r
    ]
    if reached:
        steps_ax.plot(*zip(*reached, strict=True), "o", label="steps to the target")
    reward_ax.set(xlabel="episode", ylabel="reward", title="the teacher's reward")
    steps_ax.set(xlabel="episode", ylabel="student steps", title="each student")
    for ax in (reward_ax, steps_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_weight_vs_loss(snapshot: WeightSnapshot, title: str, path: str | Path) -> Path:
    """Figure 2(a, d): each sample's weight against its training loss, coloured by class."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    _weight_vs_loss(ax, snapshot)
    ax.set_title(f"weight against loss - {title}")
    return save_figure(fig, path)


def plot_tsne(snapshot: WeightSnapshot, title: str, path: str | Path, seed: int = 0) -> Path:
    """Figure 2(b, c, e, f): t-SNE of the internal states, coloured by class and by weight."""
    fig, (by_class, by_weight) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    _tsne(fig, by_class, by_weight, snapshot, seed)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_figure2(
    snapshots: Mapping[str, WeightSnapshot], title: str, path: str | Path, seed: int = 0
) -> Path:
    """The deep-interaction paper's Figure 2 for several teachers, one row each (T0, T1):
    weight against loss by class, then the internal states' t-SNE by class and by weight."""
    fig, axes = plt.subplots(
        len(snapshots), 3, figsize=(18, 5 * len(snapshots)), squeeze=False, constrained_layout=True
    )
    for (name, snapshot), (loss_ax, by_class, by_weight) in zip(
        snapshots.items(), axes, strict=True
    ):
        _weight_vs_loss(loss_ax, snapshot)
        loss_ax.set_title(f"{name}: weight against loss")
        _tsne(fig, by_class, by_weight, snapshot, seed)
        by_class.set_title(f"{name}: internal states (t-SNE), by given label")
        by_weight.set_title(f"{name}: internal states (t-SNE), by weight")
    fig.suptitle(title)
    return save_figure(fig, path)


def _weight_vs_loss(ax: plt.Axes, snapshot: WeightSnapshot) -> None:
    classes = np.unique(snapshot.targets)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        chosen = snapshot.targets == c
        ax.scatter(
            snapshot.losses[chosen],
            snapshot.weights[chosen],
            s=6,
            alpha=0.6,
            color=cmap(i % cmap.N),
            label=str(c),
        )
    if snapshot.noisy.any():
        ax.scatter(snapshot.losses[snapshot.noisy], snapshot.weights[snapshot.noisy], s=14, facecolors="none",
                   edgecolors="black", linewidths=0.4, label="mislabeled")  # fmt: skip
    ax.set(xlabel="training loss (given label)", ylabel="weight (mean 1)")
    if len(classes) <= 20:
        ax.legend(fontsize=7, ncol=2, markerscale=2)
    ax.grid(alpha=0.3)


def _tsne(
    fig: plt.Figure, by_class: plt.Axes, by_weight: plt.Axes, snapshot: WeightSnapshot, seed: int
) -> None:
    from sklearn.manifold import TSNE

    n = len(snapshot.features)
    features = snapshot.features.astype(np.float64)
    if n < 4 or not np.isfinite(features).all() or float(features.std(axis=0).max()) == 0.0:
        # A collapsed student (all states equal) has nothing to embed; say so instead.
        for ax in (by_class, by_weight):
            ax.text(
                0.5,
                0.5,
                "internal states are all equal\n(the student has collapsed)",
                ha="center",
                va="center",
            )
            ax.set_axis_off()
        return
    embedding = TSNE(
        n_components=2, init="pca", perplexity=min(30.0, max(2.0, (n - 1) / 3)), random_state=seed
    )
    points = embedding.fit_transform(features)
    classes = np.unique(snapshot.targets)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        chosen = snapshot.targets == c
        by_class.scatter(
            points[chosen, 0], points[chosen, 1], s=5, color=cmap(i % cmap.N), label=str(c)
        )
    by_class.set_title("internal states (t-SNE), by given label")
    if len(classes) <= 20:
        by_class.legend(fontsize=7, ncol=2, markerscale=2)
    image = by_weight.scatter(points[:, 0], points[:, 1], s=5, c=snapshot.weights, cmap="coolwarm")
    fig.colorbar(image, ax=by_weight, label="weight (mean 1)")
    by_weight.set_title("internal states (t-SNE), by weight")
    for ax in (by_class, by_weight):
        ax.set_xticks([])
        ax.set_yticks([])


def plot_weight_histogram(snapshot: WeightSnapshot, title: str, path: str | Path) -> Path:
    """How the teacher's weights are spread, clean and mislabeled samples apart."""
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    bins = np.linspace(0.0, max(float(snapshot.weights.max()), 1e-6) * 1.02, 41)
    ax.hist(snapshot.weights[~snapshot.noisy], bins=bins, alpha=0.7, label="clean")
    if snapshot.noisy.any():
        ax.hist(snapshot.weights[snapshot.noisy], bins=bins, alpha=0.7, label="mislabeled")
    ax.set(xlabel="weight (mean 1)", ylabel="samples", title=f"weights - {title}")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_noisy_weight_share(
    shares: Sequence[tuple[int, float]], noise_rate: float, title: str, path: str | Path
) -> Path:
    """The share of the teacher's total weight on mislabeled samples, epoch by epoch."""
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    epochs, values = zip(*shares, strict=True)
    ax.plot(epochs, [100 * v for v in values], marker="o", label="teacher")
    ax.axhline(
        100 * noise_rate,
        color="gray",
        linestyle="--",
        label="no teacher (share of mislabeled samples)",
    )
    ax.set(
        xlabel="epoch",
        ylabel="weight on mislabeled samples (%)",
        title=f"weight on mislabeled data - {title}",
    )
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_loss_curves(
    p_true: Sequence[float],
    curves: Sequence[tuple[int, np.ndarray]],
    title: str,
    path: str | Path,
    shown: int = 6,
) -> Path:
    """A learned loss against the true class's probability at up to ``shown`` epochs, with cross-entropy.

    The L2T-DLN paper's figure of its dynamic loss network during teaching.
    Only the loss's slope moves the student; its level is arbitrary.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    picks = sorted({round(i * (len(curves) - 1) / max(shown - 1, 1)) for i in range(shown)})
    cmap = plt.get_cmap("viridis")
    for n, i in enumerate(picks):
        epoch, values = curves[i]
        ax.plot(
            p_true,
            values,
            marker=".",
            color=cmap(n / max(len(picks) - 1, 1)),
            label=f"epoch {epoch}",
        )
    ax.plot(p_true, -np.log(np.asarray(p_true)), "k--", label="cross-entropy")
    ax.set(
        xlabel="probability of the true class (others share the rest)",
        ylabel="loss",
        title=f"learned loss - {title}",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_mentor_curriculum(
    losses: np.ndarray,
    right: np.ndarray,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    path: str | Path,
) -> Path:
    """A learned MentorNet's weight against the loss, beside how often a label at that loss is right.

    ``losses``, ``right``: the record's examples (a loss each, and whether
    its label is the true one), shown as the share of right labels per loss
    bin; ``curves``: label -> (losses, weights) of the network.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    edges = np.unique(np.quantile(losses, np.linspace(0, 1, 31)))
    which = np.clip(np.digitize(losses, edges[1:-1]), 0, len(edges) - 2)
    bins = [which == b for b in np.unique(which)]
    centres = [losses[b].mean() for b in bins]
    shares = [right[b].mean() for b in bins]
    ax.plot(centres, shares, "ko", markersize=4, label="share of right labels (record)")
    cmap = plt.get_cmap("viridis")
    for n, (label, (x, v)) in enumerate(curves.items()):
        ax.plot(x, v, color=cmap(n / max(len(curves) - 1, 1)), label=label)
    ax.set(
        xlabel="loss",
        ylabel="weight v / share",
        title=f"MentorNet-DD - {title}",
        ylim=(-0.02, 1.02),
    )
    ax.set_xscale("symlog", linthresh=0.1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_weight_drift(record: DriftRecord, title: str, path: str | Path) -> Path:
    """A weight drift (:func:`metateach.lab.drift.weight_drift`). Left: the mean weights by arm.
    Right: the learning arm's change in the clean images' mean weight, split into its two parts."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    steps = np.array(record.steps)
    for column, color in ((0, "tab:blue"), (1, "tab:red")):
        group = ("clean", "mislabeled")[column]
        for values, style, what in (
            (record.learning, "-", "learning teacher"),
            (record.held, "--", "held teacher (its own student)"),
            (record.start_teacher, ":", "starting teacher on the learning student"),
        ):
            left.plot(
                steps, np.array(values)[:, column], style, color=color, label=f"{group}: {what}"
            )
    left.set(
        xlabel="step", ylabel="mean weight (mean 1 over the probe)", title=f"mean weights - {title}"
    )
    left.legend(fontsize=7)
    total = np.array(record.learning)[:, 0] - record.learning[0][0]
    right.plot(steps, total, color="black", label="change (clean)")
    right.plot(
        steps, np.array(record.teacher_part)[:, 0], color="tab:green", label="teacher's updates"
    )
    right.plot(
        steps, np.array(record.student_part)[:, 0], color="tab:orange", label="student's steps"
    )
    right.axhline(0.0, color="gray", linewidth=0.8)
    right.set(
        xlabel="step",
        ylabel="change in the clean images' mean weight",
        title="the learning arm, split",
    )
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
