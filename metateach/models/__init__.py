"""Students, registered by name: CIFAR ResNets, Wide ResNets, co-teaching's 9-layer CNN, an MLP, a LeNet-style CNN.

``create_model("resnet32", num_classes=10, in_shape=(3, 32, 32))`` builds
one; a config names it as ``model.name`` with extra arguments in
``model.kwargs``. Register your own with ``@MODELS.register("name")`` on a
function taking ``num_classes`` and ``in_shape`` and returning a
:class:`~metateach.student.Student`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from metateach.errors import ConfigError
from metateach.models.cifar_resnet import CifarResNet
from metateach.models.cnn9 import CNN9
from metateach.models.lenet import LeNet
from metateach.models.mlp import MLP
from metateach.models.wide_resnet import WideResNet
from metateach.registry import MODELS
from metateach.student import Student

if TYPE_CHECKING:
    from metateach.config import ModelConfig
    from metateach.data import DataBundle

__all__ = ["CifarResNet", "CNN9", "LeNet", "MLP", "WideResNet", "create_model", "model_for"]


def create_model(
    name: str, num_classes: int, in_shape: tuple[int, ...], kwargs: Mapping[str, Any] | None = None
) -> Student:
    """The student registered as ``name``; ``kwargs`` are checked against its arguments."""
    try:
        model = MODELS.build(
            name, kwargs or {}, "model.kwargs", num_classes=num_classes, in_shape=tuple(in_shape)
        )
    except ValueError as e:  # an architecture that cannot take this input or these options
        raise ConfigError(
            f"model {name!r} (model.name) with input {tuple(in_shape)}: {e}"
        ) from None
    if not isinstance(model, Student):
        raise TypeError(
            f"model {name!r} must build a metateach.Student, got {type(model).__name__}"
        )
    return model


def model_for(model: ModelConfig, data: DataBundle) -> Student:
    """A freshly initialized student of the configured ``model`` for ``data``'s task."""
    return create_model(model.name, data.num_classes, data.input_shape, model.kwargs)
