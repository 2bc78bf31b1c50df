"""L2T-DLN: a dynamic loss network, written by an LSTM teacher.

The student trains on the loss a small network computes from its
predicted probabilities and the label. The network's weights phi are
updated, every round of student steps, by a coordinate-wise LSTM that reads
d(validation loss)/d phi; the LSTM is trained through the rounds
(:mod:`metateach.hypergrad.learned_optimizer`).

References:
    Hai, Pan and Liu, "Learning to Teach Dynamic Loss Network", NeurIPS 2023.
    Andrychowicz et al., "Learning to learn by gradient descent by gradient
    descent", NeurIPS 2016 (the coordinate-wise LSTM and its preprocessing).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.optim.learned import CoordinatewiseLSTM
from metateach.registry import TEACHERS
from metateach.teacher import Hypergradient, LearnedUpdates, StudentView, Teacher
from metateach.types import Params

__all__ = ["ENCODINGS", "DynamicLossNetwork", "DynamicLossTeacher", "fit_to_cross_entropy"]

Encoding = Callable[[Tensor, Tensor], Tensor]


def pairwise_encoding(probs: Tensor, targets: Tensor) -> Tensor:
    """(N, C-1, 4): for each wrong class j, (p_true, p_j, t_true, t_j) with t the one-hot target.

    The target markers are the one-hot label's entries for the pair (1 and
    0 with hard labels), so that the network knows which member of the pair
    is the target.
    """
    n, c = probs.shape
    true = probs.gather(1, targets[:, None])
    wrong = ~F.one_hot(targets, c).bool()
    rivals = probs[wrong].view(n, c - 1)
    ones, zeros = torch.ones_like(rivals), torch.zeros_like(rivals)
    return torch.stack([true.expand_as(rivals), rivals, ones, zeros], dim=2)


def classwise_encoding(probs: Tensor, targets: Tensor) -> Tensor:
    """(N, C, 2): for each class k, (p_k, t_k); the network scores each class on its own."""
    onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return torch.stack([probs, onehot], dim=2)


class EncodingSpec(NamedTuple):
    """How a network reads a sample: its rows, their width, and how a sample's rows combine."""

    encode: Encoding
    width: int
    reduce: Literal["mean", "sum"]


#: name -> how the network reads a sample. The published encoding averages
#: over the wrong classes; ``classwise`` sums like cross-entropy's sum over classes.
ENCODINGS: dict[str, EncodingSpec] = {
    "pairwise": EncodingSpec(pairwise_encoding, 4, "mean"),
    "classwise": EncodingSpec(classwise_encoding, 2, "sum"),
}


class DynamicLossNetwork(nn.Module):
    """A loss function as a network: probabilities and label in, one loss per sample out.

    The published encoding (``pairwise``) feeds, for each sample and each
    wrong class j, the pair (p_true, p_j) with the target markers into an
    MLP 4 -> 40 x 4 -> 1 with LeakyReLU, and averages the outputs over j.
    ``classwise`` scores (p_k, t_k) for each class and sums. Add an encoding
    to :data:`ENCODINGS` to try another.

    Args:
        encoding: a name in :data:`ENCODINGS`.
        hidden: the MLP's width.
        depth: its hidden layers.
    """

    def __init__(self, encoding: str = "pairwise", hidden: int = 40, depth: int = 4) -> None:
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if hidden < 1 or depth < 1:
            raise ValueError(f"need hidden >= 1 and depth >= 1, got {hidden} and {depth}")
        self.encoding = ENCODINGS[encoding]
        width = self.encoding.width
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(width if i == 0 else hidden, hidden), nn.LeakyReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, 1))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The per-sample loss for the student's ``logits`` on ``targets`` (class indices)."""
        probs = logits.softmax(dim=1).to(self.mlp[0].weight.dtype)
        rows = self.mlp(self.encoding.encode(probs, targets)).squeeze(2)
        return rows.mean(dim=1) if self.encoding.reduce == "mean" else rows.sum(dim=1)


def fit_to_cross_entropy(
    network: DynamicLossNetwork, num_classes: int, steps: int, seed: int = 0
) -> float:
    """Fit ``network`` to -log p_true on random predictions; returns the final mean squared error.

    The predictions are softmaxes of Gaussian logits at scales from 0.3 to
    10, with the true class boosted at random, so that p_true covers
    (0, 1). Runs on its own random generator: the run's stream is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    device = next(network.parameters()).device
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    error = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            n = 256
            scale = torch.empty(n, 1).uniform_(-1.2, 2.3, generator=generator).exp()
            logits = torch.randn(n, num_classes, generator=generator) * scale
            targets = torch.randint(num_classes, (n,), generator=generator)
            boost = torch.empty(n).uniform_(-2, 12, generator=generator)
            logits[torch.arange(n), targets] += boost
            logits, targets = logits.to(device), targets.to(device)
            wanted = F.cross_entropy(logits, targets, reduction="none").clamp(max=10)
            error = F.mse_loss(network(logits, targets), wanted)
            optimizer.zero_grad(set_to_none=True)
            error.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # no stale gradient for whoever optimizes it next
    return float(error.detach())


@TEACHERS.register("l2t_dln")
class DynamicLossTeacher(Teacher, LearnedUpdates):
    """The student's loss is a dynamic loss network; an LSTM teacher updates the network.

    The lesson is the network as the loss function. Its weights phi change
    once a round (K student steps) by the LSTM's output for d(validation
    loss)/d phi, preprocessed as in Andrychowicz et al. The LSTM's memory
    (one state per coordinate of phi) lives for the whole teaching process
    and is saved in checkpoints. The LSTM learns through ``rounds`` rounds
    at a time (``learned_optimizer``; the published code: 15 steps, 10
    rounds).

    The network starts as a fit to cross-entropy (``init_steps`` Adam
    steps on random predictions) unless ``init_steps=0``: a random loss
    network would send the student anywhere before the teacher learned to
    correct it. The paper does not say how its network starts.

    Args:
        num_classes: the student's classes (for the initial fit).
        encoding, hidden, depth: see :class:`DynamicLossNetwork`.
        init_steps: steps of the initial fit to cross-entropy (0: random weights).
        lstm_hidden, lstm_layers, preprocess, output_scale: see
            :class:`~metateach.optim.learned.CoordinatewiseLSTM`.
    """

    learns = Hypergradient(
        "learned_optimizer", inner_steps=15, backprop_steps=15, options={"rounds": 10}
    )

    def __init__(
        self,
        num_classes: int,
        encoding: str = "pairwise",
        hidden: int = 40,
        depth: int = 4,
        init_steps: int = 1000,
        lstm_hidden: int = 20,
        lstm_layers: int = 2,
        preprocess: float = 10.0,
        output_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if init_steps < 0:
            raise ValueError(f"init_steps must be >= 0, got {init_steps}")
        self.dln = DynamicLossNetwork(encoding, hidden, depth)
        if init_steps:
            fit_to_cross_entropy(self.dln, num_classes, init_steps)
        self.dln.requires_grad_(False)  # phi is the LSTM's to write, not the optimizer's
        self.lstm = CoordinatewiseLSTM(lstm_hidden, lstm_layers, preprocess, output_scale)
        coordinates = sum(p.numel() for p in self.dln.parameters())
        self.register_buffer("memory", self.lstm.initial_memory(coordinates))
        self._weights: Params | None = None  # phi in use when it carries a graph

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson(loss_fn=partial(self.loss, self.lesson_weights_in_use()))

    def loss(self, weights: Params, logits: Tensor, targets: Tensor) -> Tensor:
        """The network's per-sample loss at ``weights``."""
        return functional_call(self.dln, weights, (logits, targets))

    def lesson_weights_in_use(self) -> Params:
        return self._weights if self._weights is not None else dict(self.dln.named_parameters())

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._weights = None  # the loaded network is the lesson now, not phi from before

    # LearnedUpdates ------------------------------------------------------

    def lesson_weights(self) -> Params:
        return {k: p.detach() for k, p in self.dln.named_parameters()}

    def use_lesson_weights(self, weights: Params) -> None:
        with torch.no_grad():
            for name, p in self.dln.named_parameters():
                p.copy_(weights[name])
        self._weights = weights

    def learned_update(self, grads: Params) -> Params:
        names = [k for k, _ in self.dln.named_parameters()]
        flat = torch.cat([grads[k].reshape(-1) for k in names])
        update, self.memory = self.lstm(flat, self.memory)
        shapes = [grads[k].shape for k in names]
        pieces = update.split([s.numel() for s in shapes])
        return {k: u.view(s) for k, u, s in zip(names, pieces, shapes, strict=True)}

    def truncate_memory(self) -> None:
        self.memory = self.memory.detach()
