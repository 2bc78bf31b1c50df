"""What a run shows in W&B beyond its scalars: the teacher's weights over time, the diagnostic
sample as a table, a learned loss's curves.

Each function returns W&B objects as builders, functions of the ``wandb`` module
(:meth:`metateach.logging.RunLogger.log_media`), so that nothing here imports
W&B and a run without it builds none. The numbers come from the teacher's
diagnostic sample (:class:`~metateach.report.diagnostics.WeightSnapshot`),
measured at every epoch's end, so none of this costs a training step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from metateach.data import DataBundle
from metateach.report.diagnostics import CURVE_KEYS, P_TRUE, WeightSnapshot

__all__ = [
    "TABLE_COLUMNS",
    "weight_histograms",
    "sample_table",
    "loss_curve_series",
]

Builder = Callable[[Any], Any]

#: The per-sample table's columns, in order (``image`` only for image data, when asked for).
TABLE_COLUMNS = (
    "index",
    "true_label",
    "given_label",
    "mislabeled",
    "loss",
    "margin",
    "weight",
    "kept",
)


def weight_histograms(snapshot: WeightSnapshot) -> dict[str, Builder]:
    """The teacher's effective weights on the sample, clean and mislabeled samples apart
    (``teacher/weights_clean``, ``teacher/weights_mislabeled``; a set with none is left out)."""
    out: dict[str, Builder] = {}
    for name, part in (("clean", ~snapshot.noisy), ("mislabeled", snapshot.noisy)):
        values = snapshot.weights[part]
        if len(values):
            out[f"teacher/weights_{name}"] = lambda wandb, v=values: wandb.Histogram(v)
    return out


def sample_table(
    snapshot: WeightSnapshot, indices: torch.Tensor, data: DataBundle, images: bool
) -> Builder:
    """The diagnostic sample as a table (:data:`TABLE_COLUMNS`; for co-teaching, what the
    student selects for its peer and whether the two selections agree; a thumbnail per sample
    with ``images`` on image data), its rows by weight, the least first: the samples the
    teacher silences lead; filter them by ``mislabeled``."""
    classes = list(data.info.classes)
    true = data.train.clean_targets[indices].tolist()
    given = snapshot.targets.tolist()
    kept = snapshot.kept if snapshot.kept is not None else np.ones(len(given), dtype=bool)
    margins = snapshot.margins if snapshot.margins is not None else np.full(len(given), np.nan)
    rows = [
        [int(i), classes[t], classes[g], bool(t != g), float(loss), float(m), float(w), bool(k)]
        for i, t, g, loss, m, w, k in zip(
            indices.tolist(), true, given, snapshot.losses, margins, snapshot.weights, kept,
            strict=True,
        )
    ]  # fmt: skip
    columns = list(TABLE_COLUMNS)
    if snapshot.peer_kept is not None:  # co-teaching: the other network's selection too
        columns += ["peer_kept", "agree"]
        rows = [
            [*row, bool(p), bool(p) == row[7]]
            for row, p in zip(rows, snapshot.peer_kept, strict=True)
        ]
    order = np.argsort(snapshot.weights, kind="stable")  # the least weight first
    rows = [rows[i] for i in order]
    pixels = data.train.images[indices] if images and data.train.images.dim() == 4 else None

    def build(wandb: Any) -> Any:
        if pixels is None:
            return wandb.Table(columns=columns, data=rows)
        thumbnails = pixels[torch.from_numpy(order)].permute(0, 2, 3, 1).numpy()  # N, H, W, C
        if thumbnails.shape[-1] == 1:
            thumbnails = thumbnails[..., 0]
        return wandb.Table(
            columns=[*columns, "image"],
            data=[[*row, wandb.Image(t)] for row, t in zip(rows, thumbnails, strict=True)],
        )

    return build


def loss_curve_series(history: Sequence[Mapping[str, float]]) -> Builder | None:
    """A learned loss against the true class's probability, one line per epoch recorded
    (``loss_curve/p_true=...``): the L2T-DLN paper's figure, as a W&B line series."""
    records = [r for r in history if CURVE_KEYS[0] in r]
    if not records:
        return None
    ys = [[r[k] for k in CURVE_KEYS] for r in records]
    keys = [f"epoch {int(r['trainer/epoch'])}" for r in records]

    def build(wandb: Any) -> Any:
        return wandb.plot.line_series(
            xs=list(P_TRUE),
            ys=ys,
            keys=keys,
            title="the learned loss against the true class's probability",
            xname="p_true",
        )

    return build
