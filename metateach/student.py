"""How a student exposes its internal states to a teacher.

A student is a feature extractor followed by a shallow head:
``logits = head(features(x))``. The deep-interaction teacher reads
``features`` (the second-to-last layer, "I0") and the maps of the stages
below it ("I1".."I3", see :attr:`Student.levels`); other teachers read only
the logits. Every student in
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
    ``head_weight`` is the head's weight when the head is a linear map (None
    otherwise), for losses on its geometry (:class:`~metateach.lesson.StatesLoss`):
    the parameter itself, so that it carries its graph, or in forward mode its
    tangent.
    """

    logits: Tensor
    features: Tensor
    maps: tuple[Tensor, ...]
    head_weight: Tensor | None = None


class Student(nn.Module, metaclass=ABCMeta):
    """A classifier split into ``stages`` -> ``pool`` -> ``head``.

    Subclasses set ``num_classes``, ``feature_dim`` and ``map_shapes`` (the
    per-sample shape of each stage's output, shallow to deep), implement
    :meth:`stages` and :meth:`pool`, and set ``levels`` when the deepest
    stage is the second-to-last layer itself; ``self.classifier`` is the head.
    """

    num_classes: int
    feature_dim: int
    map_shapes: tuple[tuple[int, ...], ...]
    #: The deep-interaction paper's I1, I2, I3 (Fan et al. 2020, Table 3): the stages
    #: below the second-to-last layer, deepest first, as indices into ``maps``. When
    #: :meth:`pool` averages the deepest stage into the features (the CIFAR ResNets),
    #: that stage's maps are I1; when the deepest stage *is* the second-to-last layer
    #: (LeNet, MLP), set ``levels`` to start one stage further down, or I1 would be I0.
    levels: tuple[int, ...] = (-1, -2, -3)
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
            linear = isinstance(self.classifier, nn.Linear)
            return StudentStates(logits, features, maps, self.classifier.weight if linear else None)
        return logits
