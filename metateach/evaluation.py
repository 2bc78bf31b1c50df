"""The student (and the networks trained beside it) measured on a split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metateach.data import BatchLoader
from metateach.distributed import all_sum

__all__ = ["evaluate_models", "evaluate_peers"]


@torch.inference_mode()
def evaluate_models(
    models: Sequence[nn.Module], loader: BatchLoader, ensemble: bool = False
) -> list[tuple[float, float]]:
    """Mean cross-entropy and accuracy of each model over a split, in eval mode.

    With ``ensemble``, one more entry: the models' averaged softmax outputs.
    """
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    rows = len(models) + ensemble
    device = next(models[0].parameters()).device
    loss_sum = torch.zeros(rows, device=device, dtype=torch.float64)
    correct = torch.zeros(rows, device=device, dtype=torch.long)
    for batch in loader:
        outputs = [m(batch.x) for m in models]
        if ensemble:  # log of the mean probability, so cross-entropy and argmax apply
            probs = torch.stack([o.float().softmax(dim=1) for o in outputs]).mean(dim=0)
            outputs.append(probs.clamp(min=1e-12).log())
        for i, logits in enumerate(outputs):
            loss_sum[i] += F.cross_entropy(logits, batch.y, reduction="sum")
            correct[i] += (logits.argmax(dim=1) == batch.y).sum()
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    if loader.shard[1] > 1:  # each rank evaluated its shard of every batch
        loss_sum, correct = all_sum([loss_sum, correct])
    n = max(len(loader.split), 1)
    # One device sync per split.
    return [
        (loss / n, int(c) / n) for loss, c in zip(loss_sum.tolist(), correct.tolist(), strict=True)
    ]


def evaluate_peers(
    student: nn.Module, peers: Mapping[str, nn.Module], loaders: Mapping[str, BatchLoader]
) -> dict[str, float]:
    """Accuracy of the networks trained beside the student (a peer), and of the ensemble of all.

    ``loaders`` by split name (``val``, ``test``); the ensemble averages the
    networks' softmax outputs. Nothing without peers.
    """
    metrics: dict[str, float] = {}
    if not peers:
        return metrics
    for split, loader in loaders.items():
        *each, ensemble = evaluate_models([student, *peers.values()], loader, ensemble=True)
        for name, (_, acc) in zip(peers, each[1:], strict=True):
            metrics[f"{name}/{split}_acc"] = acc
        metrics[f"ensemble/{split}_acc"] = ensemble[1]
    return metrics
