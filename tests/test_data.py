"""Splits, the data pipeline and the batch loader, on the embedded digits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from metateach.config import DataConfig, NoiseConfig
from metateach.data import BatchLoader, Normalize, Split, build_data, random_crop_flip
from metateach.data.splits import random_subset, stratified_split
from metateach.errors import DataError


def digits(**data: object) -> object:
    noise = {k: data.pop(k) for k in list(data) if k in ("type", "rate", "imbalance_factor")}
    noise.setdefault("seed", data.pop("noise_seed", 0))
    return build_data(DataConfig(name="digits", **data), NoiseConfig(**noise))


def test_stratified_split_is_balanced_disjoint_and_seeded() -> None:
    targets = torch.arange(1000) % 10
    drawn, rest = stratified_split(targets, 95, torch.Generator().manual_seed(0))
    counts = torch.bincount(targets[drawn], minlength=10)
    assert counts.sum() == 95 and set(counts.tolist()) == {9, 10}
    assert len(set(drawn.tolist()) | set(rest.tolist())) == 1000
    assert not set(drawn.tolist()) & set(rest.tolist())
    again, _ = stratified_split(targets, 95, torch.Generator().manual_seed(0))
    other, _ = stratified_split(targets, 95, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again) and not torch.equal(drawn, other)


def test_stratified_split_reports_a_class_too_small() -> None:
    targets = torch.tensor([0] * 50 + [1] * 3)
    with pytest.raises(
        DataError, match="needs 5 samples of class 1, which has only 3; lower data.val_size"
    ):
        stratified_split(targets, 10, torch.Generator())


def test_random_subset_names_its_key_when_too_large() -> None:
    assert len(random_subset(10, 4, torch.Generator(), "data.train_subset")) == 4
    with pytest.raises(
        DataError, match=r"data.train_subset=11 is more than the 10 samples available"
    ):
        random_subset(10, 11, torch.Generator(), "data.train_subset")


def test_validation_is_clean_and_separate_and_only_training_is_noised() -> None:
    data = digits(type="symmetric", rate=0.4)
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 180, 360)
    assert not set(data.train.pool_index.tolist()) & set(data.val.pool_index.tolist())
    assert torch.equal(data.val.targets, data.val.clean_targets)
    assert torch.equal(data.test.targets, data.test.clean_targets)
    assert 0.35 < data.noise.realized_rate < 0.45
    assert data.noise.realized_rate == pytest.approx(float(data.train.is_noisy.float().mean()))
    # The clean labels beside the noisy ones are the data set's own labels.
    clean = digits()
    assert torch.equal(data.train.clean_targets, clean.train.targets)
    assert torch.bincount(data.val.targets).tolist() == [18] * 10


def test_the_data_depend_on_data_and_noise_seeds_not_on_anything_else() -> None:
    a = digits(type="pairflip", rate=0.3)
    b = digits(type="pairflip", rate=0.3)
    assert torch.equal(a.train.targets, b.train.targets) and torch.equal(
        a.val.pool_index, b.val.pool_index
    )
    c = digits(type="pairflip", rate=0.3, noise_seed=1)
    assert torch.equal(a.train.pool_index, c.train.pool_index) and not torch.equal(
        a.train.targets, c.train.targets
    )
    d = digits(type="pairflip", rate=0.3, seed=1)
    assert not torch.equal(a.val.pool_index, d.val.pool_index)


def test_subsets_and_imbalance() -> None:
    data = digits(train_subset=300, test_subset=100, val_size=50)
    assert (len(data.train), len(data.val), len(data.test)) == (300, 50, 100)
    tail = digits(imbalance_factor=10.0, val_size=100)
    counts = torch.bincount(tail.train.targets, minlength=10).tolist()
    assert counts[0] > counts[-1] and counts[0] == pytest.approx(10 * counts[-1], abs=10)
    with pytest.raises(DataError, match="data.train_subset=5000 is more than the 1257 samples"):
        digits(train_subset=5000)


def test_the_two_halves_split_the_training_pool_and_share_the_validation_split() -> None:
    whole, first, second = digits(), digits(train_half=0), digits(train_half=1)
    a, b = set(first.train.pool_index.tolist()), set(second.train.pool_index.tolist())
    assert not a & b and a | b == set(whole.train.pool_index.tolist())
    assert abs(len(a) - len(b)) <= 1
    assert torch.equal(first.val.pool_index, whole.val.pool_index)
    assert len(digits(train_half=1, train_subset=100).train) == 100


def test_validation_taking_everything_is_an_error() -> None:
    with pytest.raises(DataError, match="class-balanced split of 1797 needs"):
        digits(val_size=1797)


def test_loader_yields_every_index_once_per_epoch_in_a_seeded_order() -> None:
    data = digits()
    loader = data.train_loader(batch_size=100, seed=3, device="cpu")
    assert len(loader) == 13
    seen = torch.cat([batch.index for batch in loader.epoch(0)])
    assert sorted(seen.tolist()) == list(range(len(data.train)))
    again = torch.cat([batch.index for batch in loader.epoch(0)])
    next_epoch = torch.cat([batch.index for batch in loader.epoch(1)])
    assert torch.equal(seen, again) and not torch.equal(seen, next_epoch)
    batch = next(iter(loader.epoch(0)))
    assert torch.equal(batch.y, data.train.targets[batch.index])
    assert batch.x.dtype == torch.float32 and batch.x.shape == (100, 1, 8, 8)


def test_loader_can_start_mid_epoch_with_identical_batches() -> None:
    data = build_data(DataConfig(name="digits"), NoiseConfig())
    data.info = dataclasses.replace(data.info, crop_padding=2, flip=True)
    loader = data.train_loader(batch_size=128, seed=0, device="cpu")
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start=4))
    assert len(tail) == len(full) - 4
    for a, b in zip(full[4:], tail, strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.index, b.index)


def test_eval_loader_is_ordered_and_unaugmented() -> None:
    data = digits()
    loader = data.eval_loader("test", batch_size=100, device="cpu")
    batches = list(loader)
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(360))
    assert torch.equal(batches[0].x, data.normalize(data.test.images[:100]))


def test_normalization_standardizes_the_training_pixels() -> None:
    data = digits()
    x = data.normalize(data.train.images)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_random_crop_flip_moves_content_and_keeps_pixels() -> None:
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[0, 0, 3, 5] = 255
    out = random_crop_flip(
        image.repeat(64, 1, 1, 1), padding=2, flip=True, generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == (64, 1, 8, 8) and out.dtype == torch.uint8
    positions = {tuple(torch.nonzero(o[0]).flatten().tolist()) for o in out}
    assert len(positions) > 5  # shifted and mirrored copies land in many places
    for o in out:
        assert int(o.sum()) in (0, 255)  # a shift may push the pixel out, never duplicate it
    # Mirroring alone keeps the row and reflects the column.
    flipped = random_crop_flip(
        image.repeat(32, 1, 1, 1), padding=0, flip=True, generator=torch.Generator().manual_seed(1)
    )
    columns = {int(torch.nonzero(o[0])[0, 1]) for o in flipped}
    assert columns == {5, 2}


def test_batch_loader_works_on_any_split() -> None:
    images = (
        torch.arange(10 * 3 * 2 * 2, dtype=torch.int64)
        .remainder(256)
        .to(torch.uint8)
        .reshape(10, 3, 2, 2)
    )
    targets = torch.arange(10) % 2
    split = Split(images, targets, targets, torch.arange(10))
    loader = BatchLoader(split, 4, Normalize(torch.zeros(3), torch.ones(3)))
    sizes = [len(b.y) for b in loader]
    assert sizes == [4, 4, 2]
    assert torch.allclose(next(iter(loader)).x, images[:4].float() / 255)
