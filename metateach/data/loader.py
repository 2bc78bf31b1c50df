"""Batches of an in-memory split, each carrying the samples' indices.

Randomness is addressed, not streamed: the order of epoch e and the
augmentation of its batch b come from seeds derived from (seed, e) and
(seed, e, b). A run resumed at any step therefore sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from metateach.data.transforms import Normalize, random_crop_flip

__all__ = [
    "Batch",
    "Split",
    "BatchLoader",
    "BatchStream",
    "RepeatedBatch",
    "WholeSplit",
    "as_batch",
    "derive_seed",
]


class Batch(NamedTuple):
    """One minibatch: inputs, the labels the student is given, and each sample's index in its split."""

    x: Tensor
    y: Tensor
    index: Tensor


def as_batch(batch: Batch | tuple[Tensor, Tensor]) -> Batch:
    """A :class:`Batch` from a plain (inputs, labels) pair, the samples indexed 0..n-1; a Batch as it is."""
    if isinstance(batch, Batch):
        return batch
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise TypeError(
            f"a batch is a Batch or an (inputs, labels) pair of tensors, got {type(batch).__name__}"
        )
    x, y = batch
    if len(x) != len(y):
        raise ValueError(f"a batch's inputs and labels differ in length: {len(x)} and {len(y)}")
    return Batch(x, y, torch.arange(len(y), device=y.device))


class Split(NamedTuple):
    """A split held in memory.

    ``targets`` are the labels the student is trained and evaluated on;
    ``clean_targets`` the true ones (they differ only on a noisy training
    split). ``pool_index`` maps each sample to its place in the data set's
    original training or test pool.
    """

    images: Tensor
    targets: Tensor
    clean_targets: Tensor
    pool_index: Tensor

    def __len__(self) -> int:  # type: ignore[override]
        return len(self.targets)

    @property
    def is_noisy(self) -> Tensor:
        return self.targets != self.clean_targets


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hashing)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1
    )


class BatchLoader:
    """Iterate over a :class:`Split` in batches of ``(x, y, index)`` on ``device``.

    Args:
        split: the samples.
        batch_size: samples per batch; the last batch of an epoch may be smaller.
        normalize: uint8 -> normalized float.
        shuffle: a new order every epoch (training) or the stored order (evaluation).
        crop_padding, flip: augmentation, see :func:`random_crop_flip`.
        seed: the root of the order and augmentation seeds.
        device: where batches are delivered.
        shard: (rank, processes): under data-parallel training, each batch
            is the rank's contiguous part of the global batch (of
            ``batch_size``), with the augmentation the whole batch would get.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        normalize: Normalize,
        *,
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.normalize = normalize
        self.shuffle = shuffle
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed
        self.device = torch.device(device)
        self.shard = shard

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def order(self, epoch: int) -> Tensor:
        """The sample order of ``epoch``."""
        n = len(self.split)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(
            n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch``, beginning with batch number ``start``."""
        order = self.order(epoch)
        for b in range(start, len(self)):
            yield self._make(order, epoch, b)

    def batch_at(self, epoch: int, b: int) -> Batch:
        """Batch ``b`` of ``epoch`` again, with the same samples and augmentation."""
        return self._make(self.order(epoch), epoch, b)

    def global_size(self, b: int) -> int:
        """The samples of batch ``b`` over all shards."""
        return max(0, min(self.batch_size, len(self.split) - b * self.batch_size))

    def _make(self, order: Tensor, epoch: int, b: int) -> Batch:
        index = order[b * self.batch_size : (b + 1) * self.batch_size]
        rank, processes = self.shard
        part = torch.tensor_split(torch.arange(len(index)), processes)[rank]
        augment = self.crop_padding > 0 or self.flip
        if not augment:
            index = index[part]
        # uint8 crosses to the device: a quarter of the bytes of float32.
        images = self.split.images[index].to(self.device, non_blocking=True)
        if augment:  # the whole batch's draws, then this shard's part
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, b))
            images = random_crop_flip(images, self.crop_padding, self.flip, generator)
            images, index = images[part.to(self.device)], index[part]
        return Batch(
            self.normalize(images),
            self.split.targets[index].to(self.device, non_blocking=True),
            index.to(self.device, non_blocking=True),
        )


class BatchStream:
    """An endless stream of batches from a loader, epoch after epoch, that can resume.

    The teacher's validation batches come from one: its position is all the
    state it has, so a checkpoint holds it in one number.
    """

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.position = 0

    def next(self) -> Batch:
        epoch, b = divmod(self.position, len(self.loader))
        self.position += 1
        return self.loader.batch_at(epoch, b)

    def draw(self) -> list[Batch]:
        """The next validation objective's data, for a validation stream: the next batch."""
        return [self.next()]


class RepeatedBatch:
    """A stream that gives the same batch every time: a validation set that is one batch.

    It has a stream's ``next()``, ``draw()`` and ``position``, so a
    :class:`~metateach.engine.problem.BilevelProblem` takes it where it takes a
    :class:`BatchStream`.
    """

    def __init__(self, batch: Batch | tuple[Tensor, Tensor]) -> None:
        self.batch = as_batch(batch)
        self.position = 0

    def next(self) -> Batch:
        self.position += 1
        return self.batch

    def draw(self) -> list[Batch]:
        return [self.next()]


class WholeSplit:
    """A validation stream whose every draw is the whole split: M(D_valid), not a batch of it.

    The split comes in the loader's batches (chunks, in order, unaugmented),
    made once and kept on the device; the outer objective is their
    size-weighted mean, and its gradient is taken chunk by chunk, so memory
    is that of one chunk. BatchNorm normalizes each chunk with its own
    statistics, as it does a training batch.
    """

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self.position = 0
        self._chunks: list[Batch] | None = None

    def draw(self) -> list[Batch]:
        self.position += 1
        if self._chunks is None:
            self._chunks = [self.loader.batch_at(0, b) for b in range(len(self.loader))]
        return self._chunks
