"""Data: data sets (a registry), splits, label noise and the batch loader.

:func:`build_data` turns the ``data`` and ``noise`` sections of a config
into a :class:`DataBundle`: clean validation and test splits, a training
split whose labels may be noisy (the clean ones kept beside them), and the
loaders that deliver ``(x, y, index)`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from metateach.data.datasets import DatasetInfo, ImageData, ImagePool, load_dataset, resolve_root
from metateach.data.loader import (
    Batch,
    BatchLoader,
    BatchStream,
    RepeatedBatch,
    Split,
    WholeSplit,
    as_batch,
    derive_seed,
)
from metateach.data.noise import NoisyLabels, apply_label_noise, transition_counts
from metateach.data.splits import long_tail_subsample, random_subset, stratified_split
from metateach.data.transforms import Normalize, channel_stats, random_crop_flip
from metateach.errors import DataError

if TYPE_CHECKING:
    from metateach.config import DataConfig, NoiseConfig

__all__ = [
    "Batch",
    "BatchLoader",
    "BatchStream",
    "DataBundle",
    "DatasetInfo",
    "ImageData",
    "ImagePool",
    "Normalize",
    "NoisyLabels",
    "RepeatedBatch",
    "WholeSplit",
    "Split",
    "apply_label_noise",
    "as_batch",
    "build_data",
    "channel_stats",
    "derive_seed",
    "load_dataset",
    "random_crop_flip",
    "resolve_root",
    "transition_counts",
]


@dataclass
class DataBundle:
    """Everything a run needs from its data."""

    train: Split
    val: Split
    test: Split
    info: DatasetInfo
    noise: NoisyLabels
    normalize: Normalize
    #: Whether training batches get the data set's standard augmentation.
    augment: bool = True

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def train_loader(
        self,
        batch_size: int,
        seed: int,
        device: torch.device | str,
        shard: tuple[int, int] = (0, 1),
    ) -> BatchLoader:
        """Shuffled, augmented training batches; order and augmentation derive from ``seed``.

        ``shard`` (rank, processes) as in :class:`BatchLoader`, here and below.
        """
        return BatchLoader(
            self.train,
            batch_size,
            self.normalize,
            shuffle=True,
            crop_padding=self.info.crop_padding if self.augment else 0,
            flip=self.info.flip and self.augment,
            seed=seed,
            device=device,
            shard=shard,
        )

    def val_stream(
        self,
        batch_size: int | str,
        seed: int,
        device: torch.device | str,
        shard: tuple[int, int] = (0, 1),
        chunk_size: int = 500,
    ) -> BatchStream | WholeSplit:
        """The clean validation data of the teacher's outer objective.

        Endless shuffled batches of ``batch_size``; with ``"all"``, the whole
        split every time, taken in chunks of ``chunk_size``.
        """
        if batch_size == "all":
            return WholeSplit(
                BatchLoader(self.val, chunk_size, self.normalize, device=device, shard=shard)
            )
        assert isinstance(batch_size, int)
        return BatchStream(
            BatchLoader(
                self.val,
                batch_size,
                self.normalize,
                shuffle=True,
                seed=seed,
                device=device,
                shard=shard,
            )  # fmt: skip
        )

    def eval_loader(
        self,
        split: str,
        batch_size: int,
        device: torch.device | str,
        shard: tuple[int, int] = (0, 1),
    ) -> BatchLoader:
        """Batches of ``"val"`` or ``"test"`` (or ``"train"``) in order, without augmentation."""
        return BatchLoader(
            getattr(self, split), batch_size, self.normalize, device=device, shard=shard
        )

    def summary(self) -> dict[str, float | int]:
        """Sizes and the noise actually applied, for the logs."""
        return {
            "data/train_size": len(self.train),
            "data/val_size": len(self.val),
            "data/test_size": len(self.test),
            "data/num_classes": self.num_classes,
            "noise/realized_rate": self.noise.realized_rate,
        }


def build_data(data: DataConfig, noise: NoiseConfig) -> DataBundle:
    """Load ``data.name``, split off clean validation, subsample, and corrupt the training labels.

    The order is fixed: (1) a class-balanced clean validation split from the
    training pool, (2) long-tailed imbalance, (3) one half of the rest, (4) the
    training subset, (5) label noise on what remains. Steps 1, 3 and 4 draw
    from ``data.seed``, steps 2 and 5 from ``noise.seed``; none depends on the
    training seed.
    """
    dataset = load_dataset(data.name, data.root, data.download, data.image_size)
    info = dataset.info
    pool_targets = dataset.train.targets
    split_rng = torch.Generator().manual_seed(data.seed)
    noise_rng = torch.Generator().manual_seed(noise.seed)

    val_size = info.default_val_size if data.val_size is None else data.val_size
    val_index, train_index = stratified_split(pool_targets, val_size, split_rng)
    if noise.imbalance_factor > 1:
        keep = long_tail_subsample(
            pool_targets[train_index], info.num_classes, noise.imbalance_factor, noise_rng
        )
        train_index = train_index[keep]
    if data.train_half is not None:  # two disjoint halves, from a draw of their own
        order = torch.randperm(
            len(train_index), generator=torch.Generator().manual_seed(derive_seed(data.seed, 1))
        )
        half = order[: len(order) // 2] if data.train_half == 0 else order[len(order) // 2 :]
        train_index = train_index[half.sort().values]
    if data.train_subset is not None:
        train_index = train_index[
            random_subset(len(train_index), data.train_subset, split_rng, "data.train_subset")
        ]
    if len(train_index) == 0:
        raise DataError(
            f"no training samples left in {dataset.source} after taking data.val_size={val_size} for validation"
        )
    test_index = torch.arange(len(dataset.test))
    if data.test_subset is not None:
        test_index = random_subset(len(test_index), data.test_subset, split_rng, "data.test_subset")

    train_images = dataset.train.load(train_index)
    noisy = apply_label_noise(
        noise.type, pool_targets[train_index], info.num_classes, noise.rate, noise_rng, train_images
    )
    if info.mean is not None and info.std is not None:
        mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    else:
        mean, std = channel_stats(train_images)

    def clean(pool: ImagePool, index: torch.Tensor) -> Split:
        return Split(pool.load(index), pool.targets[index], pool.targets[index], index)

    return DataBundle(
        train=Split(train_images, noisy.noisy, noisy.clean, train_index),
        val=clean(dataset.train, val_index),
        test=clean(dataset.test, test_index),
        info=info,
        noise=noisy,
        normalize=Normalize(mean, std),
        augment=data.augment,
    )
