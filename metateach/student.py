"""How a student exposes its internal states to a teacher.

A student is a feature extractor followed by a shallow head:
``logits = head(features(x))``. The deep-interaction teacher reads
``features`` (the second-to-last layer, "I0") and the intermediate maps
("I1".."I3"); other teachers read only the logits. Every student in
:mod:`metateach.models` subclasses :class:`Student`, and so should yours.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import NamedTuple

from torch import Tensor, nn

__all__ = ["Student", "StudentStates"]


class StudentStates(NamedTuple):
    """One forward pass, with what a teacher may look at.

    ``maps`` are the outputs of the student's stages, shallow to deep; for
    a CIFAR ResNet, the last convolutional maps at 32x32, 16x16 and 8x8.
    """

    logits: Tensor
    features: Tensor
    maps: tuple[Tensor, ...]


class Student(nn.Module, metaclass=ABCMeta):
    """A classifier split into ``stages`` -> ``pool`` -> ``head``.

    Subclasses set ``num_classes``, ``feature_dim`` and ``stage_dims`` (the
    channels, or widths, of each stage's output) and implement
    :meth:`stages` and :meth:`pool`; ``self.classifier`` is the head.
    """

    num_classes: int
    feature_dim: int
    stage_dims: tuple[int, ...]
    classifier: nn.Module

    @abstractmethod
    def stages(self, x: Tensor) -> tuple[Tensor, ...]:
        """The outputs of each stage of the feature extractor, shallow to deep."""

    @abstractmethod
    def pool(self, last_map: Tensor) -> Tensor:
        """The second-to-last layer's output, (N, feature_dim), from the deepest stage."""

    def features(self, x: Tensor) -> Tensor:
        """The second-to-last layer: what the head classifies."""
        return self.pool(self.stages(x)[-1])

    def head(self, features: Tensor) -> Tensor:
        """Logits from features."""
        return self.classifier(features)

    def forward(self, x: Tensor, return_states: bool = False) -> Tensor | StudentStates:
        """Logits; with ``return_states=True``, a :class:`StudentStates` from the same pass.

        The flag (rather than a second method) lets ``torch.func.functional_call``
        reach the internal states too.
        """
        maps = self.stages(x)
        features = self.pool(maps[-1])
        logits = self.head(features)
        if return_states:
            return StudentStates(logits, features, maps)
        return logits
