"""Label noise: each generator realizes the transition matrix it promises."""

from __future__ import annotations

import itertools

import pytest
import torch

from metateach.data import apply_label_noise, transition_counts
from metateach.data.noise import (
    flip2_matrix,
    pairflip_matrix,
    symmetric_matrix,
    tridiagonal_matrix,
    uniform_matrix,
)
from metateach.data.splits import long_tail_counts, long_tail_subsample
from metateach.registry import NOISES

C = 10
N = 200_000


def balanced_labels(n: int = N, num_classes: int = C) -> torch.Tensor:
    return torch.arange(n) % num_classes


def images_for(labels: torch.Tensor) -> torch.Tensor:
    # Class-dependent blobs plus noise, so instance noise has structure to follow.
    g = torch.Generator().manual_seed(1)
    base = torch.rand(C, 1, 6, 6, generator=g) * 200
    jitter = torch.rand(len(labels), 1, 6, 6, generator=g) * 55
    return (base[labels] + jitter).to(torch.uint8)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("symmetric", symmetric_matrix(C, 0.4)),
        ("uniform", uniform_matrix(C, 0.4)),
        ("pairflip", pairflip_matrix(C, 0.4)),
        ("tridiagonal", tridiagonal_matrix(C, 0.4)),
        ("none", torch.eye(C, dtype=torch.float64)),
    ],
)
def test_class_conditional_noise_realizes_its_matrix(name: str, expected: torch.Tensor) -> None:
    labels = balanced_labels()
    out = apply_label_noise(
        name, labels, C, 0.4 if name != "none" else 0.0, torch.Generator().manual_seed(0)
    )
    assert torch.allclose(out.promised, expected)
    # 20,000 draws per row: the binomial standard error is below 0.0035.
    assert (out.empirical - expected).abs().max() < 0.015
    assert torch.equal(out.clean, labels)


def test_matrices_have_the_published_shapes() -> None:
    r = 0.4
    sym = symmetric_matrix(C, r)
    assert torch.allclose(sym.diag(), torch.full((C,), 1 - r, dtype=torch.float64))
    assert torch.allclose(sym[0, 1:], torch.full((C - 1,), r / (C - 1), dtype=torch.float64))
    uni = uniform_matrix(C, r)
    assert uni[0, 0] == pytest.approx(1 - r + r / C) and uni[0, 5] == pytest.approx(r / C)
    pair = pairflip_matrix(C, r)
    assert pair[3, 4] == pytest.approx(r) and pair[C - 1, 0] == pytest.approx(r) and pair[3, 2] == 0
    tri = tridiagonal_matrix(C, r)
    assert (
        tri[3, 2] == pytest.approx(r / 2)
        and tri[3, 4] == pytest.approx(r / 2)
        and tri[0, C - 1] == pytest.approx(r / 2)
    )
    assert tri[3, 5] == 0
    for matrix in (sym, uni, pair, tri):
        assert torch.allclose(matrix.sum(dim=1), torch.ones(C, dtype=torch.float64))


def test_flip2_sends_each_class_to_two_others_evenly() -> None:
    matrix = flip2_matrix(C, 0.4, torch.Generator().manual_seed(3))
    for i in range(C):
        off = [j for j in range(C) if j != i and matrix[i, j] > 0]
        assert len(off) == 2
        assert matrix[i, off].tolist() == pytest.approx([0.2, 0.2])
        assert matrix[i, i] == pytest.approx(0.6)
    labels = balanced_labels()
    out = apply_label_noise("flip2", labels, C, 0.4, torch.Generator().manual_seed(3))
    assert (out.empirical - out.promised).abs().max() < 0.015
    # The random choice of targets depends on the seed.
    other = apply_label_noise("flip2", labels, C, 0.4, torch.Generator().manual_seed(4))
    assert not torch.equal(out.promised, other.promised)


def test_instance_noise_depends_on_the_image_and_averages_to_the_rate() -> None:
    labels = balanced_labels(50_000)
    images = images_for(labels)
    rows = NOISES.get("instance")(labels, C, 0.3, torch.Generator().manual_seed(0), images)
    assert torch.allclose(rows.sum(dim=1), torch.ones(len(labels), dtype=torch.float64))
    keep = rows[torch.arange(len(labels)), labels]
    assert keep.std() > 0.05  # samples of one class flip with different probabilities
    assert (1 - keep).mean() == pytest.approx(0.3, abs=0.01)
    out = apply_label_noise("instance", labels, C, 0.3, torch.Generator().manual_seed(0), images)
    assert (out.empirical - out.promised).abs().max() < 0.02
    assert out.realized_rate == pytest.approx(0.3, abs=0.01)
    # Where a flipped label goes depends on the image: two images of one class
    # spread their flip probability differently over the other classes.
    off = rows / (1 - keep).unsqueeze(1)
    off[torch.arange(len(labels)), labels] = 0
    class0 = off[labels == 0]
    assert (class0 - class0.mean(dim=0)).abs().max() > 0.5


def test_instance_noise_at_rate_zero_changes_nothing() -> None:
    labels = balanced_labels(1000)
    out = apply_label_noise(
        "instance", labels, C, 0.0, torch.Generator().manual_seed(0), images_for(labels)
    )
    assert torch.equal(out.noisy, labels)


@pytest.mark.parametrize(
    "name", ["symmetric", "uniform", "pairflip", "tridiagonal", "flip2", "instance"]
)
def test_noise_is_deterministic_by_seed(name: str) -> None:
    labels = balanced_labels(5000)
    images = images_for(labels)
    a = apply_label_noise(name, labels, C, 0.4, torch.Generator().manual_seed(7), images)
    b = apply_label_noise(name, labels, C, 0.4, torch.Generator().manual_seed(7), images)
    c = apply_label_noise(name, labels, C, 0.4, torch.Generator().manual_seed(8), images)
    assert torch.equal(a.noisy, b.noisy)
    assert not torch.equal(a.noisy, c.noisy)
    assert a.realized_rate == pytest.approx(float((a.noisy != labels).float().mean()))


def test_symmetric_noise_never_keeps_a_changed_label_on_its_class() -> None:
    labels = balanced_labels(20_000)
    out = apply_label_noise("symmetric", labels, C, 0.5, torch.Generator().manual_seed(0))
    assert out.realized_rate == pytest.approx(0.5, abs=0.015)
    uni = apply_label_noise("uniform", labels, C, 0.5, torch.Generator().manual_seed(0))
    # Uniform noise may redraw the own class: only (C-1)/C of the redrawn labels change.
    assert uni.realized_rate == pytest.approx(0.5 * (C - 1) / C, abs=0.015)


def test_transition_counts_counts_pairs() -> None:
    clean = torch.tensor([0, 0, 1, 2, 2, 2])
    noisy = torch.tensor([0, 1, 1, 2, 0, 0])
    counts = transition_counts(clean, noisy, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 1]]


def test_long_tail_follows_the_imbalance_factor() -> None:
    counts = long_tail_counts(5000, 10, 100)
    assert counts[0] == 5000 and counts[-1] == 50
    assert all(a > b for a, b in itertools.pairwise(counts))
    assert counts[5] == int(5000 * 100 ** (-5 / 9))
    labels = balanced_labels(50_000)
    kept = long_tail_subsample(labels, 10, 100, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[kept], minlength=10).tolist() == counts
    assert len(torch.unique(kept)) == len(kept)
