"""A multi-layer perceptron over flattened images."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from torch import Tensor, nn

from metateach.registry import MODELS
from metateach.student import Student

__all__ = ["MLP"]


class MLP(Student):
    """Linear-ReLU layers of the given widths, then a linear head.

    The stages are the hidden layers' activations; the last one is the
    second-to-last layer a teacher reads (I0), and the ones before it, deepest
    first, are I1, I2, I3.
    """

    levels = (-2, -3, -4)

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, ...],
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer (model.kwargs.hidden)")
        self.num_classes = num_classes
        self.feature_dim = hidden[-1]
        self.map_shapes = tuple((width,) for width in hidden)
        widths = [math.prod(in_shape), *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(hidden[-1], num_classes)

    def stages(self, x: Tensor) -> tuple[Tensor, ...]:
        h = x.flatten(1)
        outputs = []
        for layer in self.layers:
            h = self.dropout(layer(h).relu())
            outputs.append(h)
        return tuple(outputs)

    def pool(self, last_map: Tensor) -> Tensor:
        return last_map


@MODELS.register("mlp")
def mlp(
    num_classes: int,
    in_shape: tuple[int, ...],
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
) -> MLP:
    """An MLP with ReLU hidden layers of widths ``hidden``."""
    return MLP(num_classes, in_shape, tuple(hidden), dropout)
