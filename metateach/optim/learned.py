"""A learned optimizer: a coordinate-wise LSTM that turns gradients into updates.

References:
    Andrychowicz, Denil, Gomez, Hoffman, Pfau, Schaul, Shillingford and de
    Freitas, "Learning to learn by gradient descent by gradient descent",
    NeurIPS 2016 (Sec. 2.1 and Appendix A: coordinate-wise LSTM, gradient
    preprocessing).
    Hai, Pan and Liu, "Learning to Teach Dynamic Loss Network", NeurIPS 2023
    (the LSTM teacher that updates a dynamic loss network).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["CoordinatewiseLSTM", "preprocess_gradients"]


def preprocess_gradients(grad: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al.'s log-magnitude and sign encoding of a flat gradient, shape (n, 2).

    ``(log|g| / p, sign g)`` where ``|g| >= exp(-p)``, ``(-1, exp(p) g)``
    elsewhere: gradients that span many orders of magnitude become inputs
    of order one, and the tiny ones keep their value rather than a noisy log.
    """
    large = grad.abs() >= math.exp(-p)
    magnitude = torch.where(large, grad.abs().clamp(min=math.exp(-p)).log() / p, -1.0)
    direction = torch.where(large, grad.sign(), grad * math.exp(p))
    return torch.stack([magnitude, direction], dim=1)


class CoordinatewiseLSTM(nn.Module):
    """An LSTM applied to every coordinate of a parameter vector, with shared weights.

    Each coordinate is a batch row: it reads its own preprocessed gradient
    and keeps its own memory, so one small LSTM updates any number of
    parameters. The memory is returned, not kept: the caller decides how
    long it lives and where its graph is cut.

    Args:
        hidden: width of each LSTM layer (20 in Andrychowicz et al.).
        layers: stacked LSTM layers (2 in Andrychowicz et al.).
        preprocess: the constant p of :func:`preprocess_gradients`; 0 feeds raw gradients.
        output_scale: the update is the output layer's value times this (0.1 in Andrychowicz et al.).
    """

    def __init__(
        self, hidden: int = 20, layers: int = 2, preprocess: float = 10.0, output_scale: float = 0.1
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise ValueError(f"need hidden >= 1 and layers >= 1, got {hidden} and {layers}")
        if preprocess < 0:
            raise ValueError(f"preprocess must be >= 0 (0 feeds raw gradients), got {preprocess}")
        self.hidden, self.layers = hidden, layers
        self.preprocess, self.output_scale = preprocess, output_scale
        width = 2 if preprocess > 0 else 1
        self.cells = nn.ModuleList(
            nn.LSTMCell(width if i == 0 else hidden, hidden) for i in range(layers)
        )
        self.out = nn.Linear(hidden, 1)
        # Zero updates to start with: the teacher begins from the loss it was
        # given and moves it only as far as the validation signal pulls.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def initial_memory(self, coordinates: int, device: torch.device | None = None) -> Tensor:
        """Zero memory for ``coordinates`` parameters: shape (layers, 2, coordinates, hidden)."""
        weight = self.out.weight
        return torch.zeros(
            self.layers,
            2,
            coordinates,
            self.hidden,
            device=device or weight.device,
            dtype=weight.dtype,
        )

    def forward(self, grad: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """The update for each coordinate of the flat gradient ``grad``, and the new memory."""
        x = preprocess_gradients(grad, self.preprocess) if self.preprocess > 0 else grad[:, None]
        x = x.to(self.out.weight.dtype)
        states = []
        for i, cell in enumerate(self.cells):
            h, c = cell(x, (memory[i, 0], memory[i, 1]))
            states.append(torch.stack([h, c]))
            x = h
        return self.out(x).squeeze(1) * self.output_scale, torch.stack(states)
