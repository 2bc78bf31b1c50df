"""Deterministic ways to cut a pool of labelled samples: a class-balanced
split, a long-tailed subsample, a random subset. All return index tensors
(sorted) and draw only from the generator they are given."""

from __future__ import annotations

import torch
from torch import Tensor

from metateach.errors import DataError

__all__ = ["stratified_split", "long_tail_counts", "long_tail_subsample", "random_subset"]


def stratified_split(
    targets: Tensor, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw ``size`` indices with classes as equal as possible; return (drawn, rest).

    Each class gives ``size // C`` samples and ``size % C`` randomly chosen
    classes give one more; this is how clean validation (meta) sets are
    taken in MW-Net and in the deep-interaction paper's 45k/5k CIFAR split.
    """
    classes = torch.unique(targets)
    per_class = torch.full((len(classes),), size // len(classes), dtype=torch.long)
    per_class[torch.randperm(len(classes), generator=generator)[: size % len(classes)]] += 1
    drawn = []
    for c, n in zip(classes.tolist(), per_class.tolist(), strict=True):
        members = torch.nonzero(targets == c).flatten()
        if n > len(members):
            raise DataError(
                f"a class-balanced split of {size} needs {n} samples of class {c}, "
                f"which has only {len(members)}; lower data.val_size"
            )
        drawn.append(members[torch.randperm(len(members), generator=generator)[:n]])
    chosen = torch.zeros(len(targets), dtype=torch.bool)
    if drawn:
        chosen[torch.cat(drawn)] = True
    return torch.nonzero(chosen).flatten(), torch.nonzero(~chosen).flatten()


def long_tail_counts(largest: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class sizes decaying exponentially from ``largest`` to ``largest / imbalance_factor``.

    n_c = largest * imbalance_factor ** (-c / (C - 1)), the long-tailed
    CIFAR of Cui et al. (2019) that MW-Net (Shu et al., 2019) uses.
    """
    if num_classes == 1:
        return [largest]
    return [int(largest * imbalance_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_subsample(
    targets: Tensor, num_classes: int, imbalance_factor: float, generator: torch.Generator
) -> Tensor:
    """Indices of a long-tailed subsample: class c keeps ``long_tail_counts(...)[c]`` random members.

    ``largest`` is the smallest class size present, so every class can supply its share.
    """
    members = [torch.nonzero(targets == c).flatten() for c in range(num_classes)]
    largest = min(len(m) for m in members)
    kept = [
        m[torch.randperm(len(m), generator=generator)[:n]]
        for m, n in zip(
            members, long_tail_counts(largest, num_classes, imbalance_factor), strict=True
        )
    ]
    return torch.cat(kept).sort().values


def random_subset(size: int, count: int, generator: torch.Generator, key: str) -> Tensor:
    """``count`` random indices out of ``range(size)``, sorted; ``key`` names the setting in errors."""
    if count > size:
        raise DataError(f"{key}={count} is more than the {size} samples available")
    return torch.randperm(size, generator=generator)[:count].sort().values
