"""Label noise for the training split, registered by name.

Each noise model gives, for every sample, the distribution its noisy label
is drawn from: an (N, C) row-stochastic matrix. Class-conditional models
are rows of one transition matrix T, with T[i, j] = P(noisy = j | clean = i);
the instance-dependent model gives each sample a row of its own. A model's
*promised* transition matrix is the class-wise mean of its rows, and the
tests check that the labels it draws realize it.

References:
    Zhang et al., "Understanding deep learning requires rethinking
    generalization", ICLR 2017 (uniform noise).
    Han et al., "Co-teaching", NeurIPS 2018 (symmetric and pair-flip noise).
    Shu et al., "Meta-Weight-Net", NeurIPS 2019 (uniform and flip-to-two noise).
    Zhang, Niu and Sugiyama, "Learning noise transition matrices from only
    noisy labels via total variation regularization", ICML 2021 (tridiagonal).
    Xia et al., "Part-dependent label noise: towards instance-dependent
    label noise", NeurIPS 2020 (the instance-dependent generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metateach.data.transforms import channel_stats
from metateach.registry import NOISES

__all__ = [
    "NoisyLabels",
    "apply_label_noise",
    "transition_counts",
    "symmetric_matrix",
    "uniform_matrix",
    "pairflip_matrix",
    "tridiagonal_matrix",
    "flip2_matrix",
    "instance_rows",
]


@dataclass
class NoisyLabels:
    """Noisy labels beside the clean ones, with what was promised and what came out."""

    noisy: Tensor
    clean: Tensor
    #: The class-wise mean of the per-sample noise distributions, (C, C).
    promised: Tensor
    #: Row-normalized counts of (clean, noisy) pairs, (C, C).
    empirical: Tensor

    @property
    def realized_rate(self) -> float:
        """The share of samples whose label was changed."""
        return float((self.noisy != self.clean).float().mean()) if len(self.clean) else 0.0


def apply_label_noise(
    name: str,
    labels: Tensor,
    num_classes: int,
    rate: float,
    generator: torch.Generator,
    images: Tensor | None = None,
) -> NoisyLabels:
    """Corrupt ``labels`` with the noise model registered as ``name``.

    ``images`` (N, ...) are needed only by instance-dependent noise.
    """
    labels = labels.long()
    rows = NOISES.get(name)(labels, num_classes, rate, generator, images)
    noisy = (
        torch.multinomial(rows, 1, generator=generator).flatten() if len(labels) else labels.clone()
    )
    promised = torch.zeros(num_classes, num_classes, dtype=rows.dtype).index_add_(0, labels, rows)
    promised /= (
        torch.bincount(labels, minlength=num_classes).clamp(min=1).unsqueeze(1).to(rows.dtype)
    )
    return NoisyLabels(
        noisy, labels, promised, _normalize_rows(transition_counts(labels, noisy, num_classes))
    )


def transition_counts(clean: Tensor, noisy: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts of samples with clean label i and noisy label j."""
    flat = clean.long() * num_classes + noisy.long()
    return (
        torch.bincount(flat, minlength=num_classes * num_classes)
        .reshape(num_classes, num_classes)
        .double()
    )


def _normalize_rows(counts: Tensor) -> Tensor:
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------- #
# Class-conditional transition matrices
# --------------------------------------------------------------------------- #


def symmetric_matrix(num_classes: int, rate: float) -> Tensor:
    """A label moves with probability ``rate``, uniformly to one of the *other* classes (co-teaching)."""
    if num_classes == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    off = rate / (num_classes - 1)
    return torch.full((num_classes, num_classes), off, dtype=torch.float64).fill_diagonal_(1 - rate)


def uniform_matrix(num_classes: int, rate: float) -> Tensor:
    """With probability ``rate`` a label is redrawn uniformly from *all* classes, its own included.

    The expected share of changed labels is therefore ``rate * (C - 1) / C``
    (Zhang et al. 2017; MW-Net's ``uniform_mix_C``).
    """
    return torch.full((num_classes, num_classes), rate / num_classes, dtype=torch.float64) + (
        1 - rate
    ) * torch.eye(num_classes, dtype=torch.float64)


def pairflip_matrix(num_classes: int, rate: float) -> Tensor:
    """Class i flips to class i+1 (mod C) with probability ``rate`` (co-teaching's pair flip)."""
    eye = torch.eye(num_classes, dtype=torch.float64)
    return (1 - rate) * eye + rate * eye.roll(1, dims=1)


def tridiagonal_matrix(num_classes: int, rate: float) -> Tensor:
    """Class i flips to each neighbour i-1 and i+1 (mod C) with probability ``rate / 2``.

    Adjacent classes are confused in both directions: the product of two
    opposite pair flips (Zhang, Niu and Sugiyama, 2021), parametrized here
    so that ``rate`` is the total flip probability.
    """
    eye = torch.eye(num_classes, dtype=torch.float64)
    return (1 - rate) * eye + rate / 2 * (eye.roll(1, dims=1) + eye.roll(-1, dims=1))


def flip2_matrix(num_classes: int, rate: float, generator: torch.Generator) -> Tensor:
    """Each class flips with probability ``rate``, evenly to two other classes chosen at random.

    The "flip noise" of MW-Net (``flip_labels_C_two``) and of the
    deep-interaction paper's Table 6.
    """
    matrix = (1 - rate) * torch.eye(num_classes, dtype=torch.float64)
    for i in range(num_classes):
        others = torch.tensor([c for c in range(num_classes) if c != i])
        targets = others[torch.randperm(len(others), generator=generator)[:2]]
        matrix[i, targets] += rate / len(targets)
    return matrix


def _class_conditional(matrix_fn):  # type: ignore[no-untyped-def]
    def rows(
        labels: Tensor,
        num_classes: int,
        rate: float,
        generator: torch.Generator,
        images: Tensor | None,
    ) -> Tensor:
        return matrix_fn(num_classes, rate)[labels]

    rows.__doc__ = matrix_fn.__doc__
    return rows


NOISES.register("symmetric")(_class_conditional(symmetric_matrix))
NOISES.register("uniform")(_class_conditional(uniform_matrix))
NOISES.register("pairflip")(_class_conditional(pairflip_matrix))
NOISES.register("tridiagonal")(_class_conditional(tridiagonal_matrix))


@NOISES.register("none")
def no_noise(
    labels: Tensor, num_classes: int, rate: float, generator: torch.Generator, images: Tensor | None
) -> Tensor:
    """Clean labels."""
    return torch.eye(num_classes, dtype=torch.float64)[labels]


@NOISES.register("flip2")
def flip2_rows(
    labels: Tensor, num_classes: int, rate: float, generator: torch.Generator, images: Tensor | None
) -> Tensor:
    """MW-Net's flip noise: see :func:`flip2_matrix`."""
    return flip2_matrix(num_classes, rate, generator)[labels]


# --------------------------------------------------------------------------- #
# Instance-dependent noise
# --------------------------------------------------------------------------- #


@NOISES.register("instance")
def instance_rows(
    labels: Tensor, num_classes: int, rate: float, generator: torch.Generator, images: Tensor | None
) -> Tensor:
    """Instance-dependent noise, the generator of Xia et al. (2020); ``images`` are (N, C, H, W) uint8.

    1. Each sample n gets a flip rate q_n from N(rate, 0.1^2) truncated to [0, 1].
    2. Each class c gets a random projection W_c ~ N(0, 1) of shape (S, C).
    3. The sample's flat image x_n, standardized per channel as the data
       set's normalizing transform would, scores the classes as x_n W_{y_n};
       its own class is excluded, and the others share q_n in proportion to
       the softmax of those scores.
    4. The clean label keeps probability 1 - q_n.

    So the chance of a flip varies from image to image, and where a flipped
    label goes depends on the image. The mean flip rate is ``rate`` up to the
    truncation of q.
    """
    if images is None:
        raise ValueError("instance-dependent noise needs the images")
    n = len(labels)
    if rate == 0 or n == 0:
        return no_noise(labels, num_classes, rate, generator, images)
    q = _truncated_normal(n, rate, 0.1, generator)
    mean, std = channel_stats(images)
    shape = (1, -1, 1, 1)
    scores = torch.empty(n, num_classes, dtype=torch.float64)
    for c in range(num_classes):
        # One class at a time: a standardized copy of the whole split would be large.
        projection = torch.randn(
            images[0].numel(), num_classes, generator=generator, dtype=torch.float64
        )
        members = labels == c
        pixels = images[members].double() / 255.0
        standardized = (pixels - mean.double().view(shape)) / std.double().view(shape)
        scores[members] = standardized.flatten(1) @ projection
    own = torch.nn.functional.one_hot(labels, num_classes).bool()
    rows = q.unsqueeze(1) * scores.masked_fill(own, float("-inf")).softmax(dim=1)
    return rows.masked_scatter(own, 1 - q)


def _truncated_normal(n: int, mean: float, std: float, generator: torch.Generator) -> Tensor:
    """n draws of N(mean, std^2) restricted to [0, 1], by rejection."""
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.ones(n, dtype=torch.bool)
    while todo.any():
        draw = mean + std * torch.randn(int(todo.sum()), generator=generator, dtype=torch.float64)
        out[todo] = draw
        todo = (out < 0) | (out > 1)
    return out
