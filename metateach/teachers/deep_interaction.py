"""The deep-interaction teacher: sample weights from the student's internal states.

References:
    Fan, Xia, Wu, Xie, Liu, Bian, Qin, Li and Liu, "Learning to Teach with
    Deep Interactions", 2020 (Sec. 3.3, Tables 2-4 and 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.student import Student
from metateach.teacher import Hypergradient, StudentView, Teacher

__all__ = ["DeepInteractionTeacher", "FEATURES", "LEVELS"]

#: The paper's feature groups (Sec. 4.3).
FEATURES = {
    "I0": "the second-to-last layer (the default internal state)",
    "I1": "the maps of the deepest stage below I0 (8x8 on CIFAR ResNets)",
    "I2": "the maps one stage shallower (16x16 on CIFAR ResNets)",
    "I3": "the maps two stages shallower (32x32 on CIFAR ResNets)",
    "M0": "a learned embedding of the label",
    "M1": "surface features: normalized iteration, average training loss so far, best "
    "validation accuracy, predicted label (one-hot), margin",
}

#: The internal-state levels below I0, in order.
LEVELS = ("I1", "I2", "I3")


@TEACHERS.register("deep_interaction")
class DeepInteractionTeacher(Teacher):
    """w = sigmoid(MLP([I; E y; ...])), normalized per batch to sum to its size.

    With the defaults (``features=[I0, M0]``, ``hidden_layers=0``) this is
    the paper's teacher, w = sigmoid(W_I I0 + W_M E y + b). ``hidden_layers``
    adds ReLU layers as wide as the input (MLP-1, MLP-2 of Table 4). The
    output layer starts at zero, so teaching starts from uniform weights.
    It learns by reverse mode through K = 20 student steps, B = 2 of them
    differentiated: ``reversible`` is the paper's Algorithm 1 (momentum SGD
    run backwards, constant memory); ``unrolled`` gives the same gradient
    by keeping the steps' graphs.

    **Levels** (Table 3). I1, I2 and I3 are the feature maps of the stages
    below the second-to-last layer, deepest first (:attr:`Student.levels`),
    each flattened: the paper feeds "the outputs of the last convolutional
    layer with size 8x8, 16x16 and 32x32" to the same linear teacher as I0,
    and a linear map over a flattened map can weigh every position, which
    pooling to a vector (the mean of I1 *is* I0 on a ResNet) cannot. The
    widths this gives on 32x32 images:

    ===========  ====  ==================  ==================  ===================
    student      I0    I1                  I2                  I3
    ===========  ====  ==================  ==================  ===================
    ResNet-32    64    64x8x8 = 4,096      32x16x16 = 8,192    16x32x32 = 16,384
    ResNet-110   64    64x8x8 = 4,096      32x16x16 = 8,192    16x32x32 = 16,384
    WRN-28-10    640   640x8x8 = 40,960    320x16x16 = 81,920  160x32x32 = 163,840
    LeNet        500   50x4x4 = 800        20x12x12 = 2,880    (refused)
    ===========  ====  ==================  ==================  ===================

    (LeNet on 28x28 MNIST: its fc layer is I0, so I1 is conv2's maps; an MLP's
    I1 is the hidden layer before the last.) ``map_grid=g`` instead averages
    each map to g x g positions first (C*g*g values), for wide students
    where a flattened map makes the teacher larger than wanted; a hidden
    layer (``hidden_layers``) is as wide as the input, so with flattened
    levels prefer a grid.

    Args:
        num_classes: the label embedding's rows and M1's one-hot width.
        student: the student, whose layer shapes size the input.
        features: any of ``I0 I1 I2 I3 M0 M1`` (see :data:`FEATURES`).
        hidden_layers: 0, 1 or 2.
        embedding_dim: the width of the label embedding E.
        map_grid: unset, the levels' maps flattened as they are; g, pooled to g x g first.
    """

    learns = Hypergradient("reversible", inner_steps=20, backprop_steps=2)
    #: M1's "average training loss until the current iteration" is the mean since the start.
    loss_average = "mean"
    #: Moved to another class count (Appendix B), the label embedding starts afresh.
    per_class = ("embedding.weight",)

    def __init__(
        self,
        num_classes: int,
        student: Student,
        features: Sequence[str] = ("I0", "M0"),
        hidden_layers: int = 0,
        embedding_dim: int = 16,
        map_grid: int | None = None,
    ) -> None:
        super().__init__()
        self.features = tuple(features)
        unknown = [f for f in self.features if f not in FEATURES]
        if unknown or not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(
                f"features must be distinct names among {', '.join(FEATURES)}, got {list(features)}"
            )
        if not 0 <= hidden_layers <= 2:
            raise ValueError(f"hidden_layers must be 0, 1 or 2 (MLP-0/1/2), got {hidden_layers}")
        if map_grid is not None and map_grid < 1:
            raise ValueError(f"map_grid must be unset or a grid size >= 1, got {map_grid}")
        self.num_classes = num_classes
        self.map_grid = map_grid
        levels = dict(
            zip(LEVELS, [i for i in student.levels if -i <= len(student.map_shapes)], strict=False)
        )
        missing = [name for name in self.features if name in LEVELS and name not in levels]
        if missing:
            raise ValueError(
                f"{missing[0]} is not available: {type(student).__name__} has "
                f"{len(levels)} stage(s) below its second-to-last layer "
                f"({', '.join(levels) or 'none'})"
            )
        self.levels = {name: index for name, index in levels.items() if name in self.features}
        widths = {
            "I0": student.feature_dim,
            "M0": embedding_dim,
            "M1": num_classes + 4,
            **{
                name: math.prod(self._level_shape(student.map_shapes[index]))
                for name, index in self.levels.items()
            },
        }
        self.embedding = nn.Embedding(num_classes, embedding_dim) if "M0" in self.features else None
        width = sum(widths[f] for f in self.features)
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, width), nn.ReLU()]
        out = nn.Linear(width, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def _level_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A level's per-sample shape as the teacher reads it."""
        if self.map_grid is None or len(shape) == 1:
            return shape
        return (shape[0], self.map_grid, self.map_grid)

    def _level(self, states: Tensor) -> Tensor:
        """One level's maps as the teacher reads them: (N, ...) -> (N, width)."""
        if self.map_grid is not None and states.dim() == 4:
            states = F.adaptive_avg_pool2d(states, self.map_grid)
        return states.flatten(1)

    def inputs(self, batch: Batch, view: StudentView) -> Tensor:
        """The teacher's input for each sample: the chosen feature groups, concatenated."""
        parts = []
        for name in self.features:
            if name == "I0":
                parts.append(view.features)
            elif name in self.levels:
                parts.append(self._level(view.maps[self.levels[name]]))
            elif name == "M0":
                assert self.embedding is not None
                parts.append(self.embedding(batch.y))
            else:
                parts.append(self._surface(batch, view))
        dtype = self.net[-1].weight.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        return Lesson.weighted(torch.sigmoid(self.net(self.inputs(batch, view)).squeeze(1)))

    def _surface(self, batch: Batch, view: StudentView) -> Tensor:
        """M1: normalized iteration, average training loss, best validation accuracy, predicted label, margin."""
        n = len(batch.y)
        probs = view.logits.softmax(dim=1)
        true = probs.gather(1, batch.y[:, None]).squeeze(1)
        rival = probs.scatter(1, batch.y[:, None], 0.0).amax(dim=1)
        history = view.context.history(probs.dtype, probs.device)
        predicted = F.one_hot(probs.argmax(dim=1), self.num_classes).to(probs.dtype)
        return torch.cat([history.expand(n, 3), predicted, (true - rival)[:, None]], dim=1)
