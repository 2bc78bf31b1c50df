"""Figures a researcher would rather look at than read, saved as PNGs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = ["plot_transition_matrix", "plot_training_curves"]


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
    return _save(fig, path)


def plot_training_curves(
    history: Sequence[Mapping[str, float]], title: str, path: str | Path
) -> Path:
    """Loss and accuracy per epoch for the training, validation and test splits."""
    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for split, style in (("train", "-"), ("val", "--"), ("test", ":")):
        if f"{split}/loss" in history[0]:
            loss_ax.plot(epochs, [r[f"{split}/loss"] for r in history], style, label=split)
            acc_ax.plot(epochs, [100 * r[f"{split}/acc"] for r in history], style, label=split)
    if "train/clean_acc" in history[0]:
        acc_ax.plot(
            epochs,
            [100 * r["train/clean_acc"] for r in history],
            "-.",
            label="train (clean labels)",
        )
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
