"""The deep-interaction teacher: sample weights from the student's internal states.

References:
    Fan, Xia, Wu, Xie, Liu, Bian, Qin, Li and Liu, "Learning to Teach with
    Deep Interactions", 2020 (Sec. 3.3, Tables 2-4 and 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metateach.data import Batch
from metateach.lesson import Lesson
from metateach.registry import TEACHERS
from metateach.student import Student
from metateach.teacher import Hypergradient, StudentView, Teacher

__all__ = ["DeepInteractionTeacher", "FEATURES"]

#: The paper's feature groups.
FEATURES = {
    "I0": "the second-to-last layer (the default internal state)",
    "I1": "the deepest stage's maps, pooled (8x8 on CIFAR ResNets)",
    "I2": "the second-deepest stage's maps, pooled (16x16)",
    "I3": "the third-deepest stage's maps, pooled (32x32)",
    "M0": "a learned embedding of the label",
    "M1": "surface features: normalized iteration, running average training loss, best "
    "validation accuracy, predicted label (one-hot), margin",
}


@TEACHERS.register("deep_interaction")
class DeepInteractionTeacher(Teacher):
    """w = sigmoid(MLP([I; E y; ...])), normalized per batch to sum to its size.

    With the defaults (``features=[I0, M0]``, ``hidden_layers=0``) this is
    the paper's teacher, w = sigmoid(W_I I + W_M E y + b). ``hidden_layers``
    adds ReLU layers as wide as the input (MLP-1, MLP-2 of Table 4). The
    output layer starts at zero, so teaching starts from uniform weights.
    It learns by truncated reverse mode with K = 20 and B = 2 (``unrolled``;
    ``reversible`` gives the same gradient in constant memory).

    Args:
        num_classes: the label embedding's rows and M1's one-hot width.
        student: the student, whose layer widths size the input.
        features: any of ``I0 I1 I2 I3 M0 M1`` (see :data:`FEATURES`).
        hidden_layers: 0, 1 or 2.
        embedding_dim: the width of the label embedding E.
    """

    learns = Hypergradient("unrolled", inner_steps=20, backprop_steps=2)

    def __init__(
        self,
        num_classes: int,
        student: Student,
        features: Sequence[str] = ("I0", "M0"),
        hidden_layers: int = 0,
        embedding_dim: int = 16,
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
        depth = {"I1": 1, "I2": 2, "I3": 3}
        for name, needed in depth.items():
            if name in self.features and len(student.stage_dims) < needed:
                raise ValueError(
                    f"{name} needs a student with {needed} stages; it has {len(student.stage_dims)}"
                )
        self.num_classes = num_classes
        widths = {
            "I0": student.feature_dim,
            "M0": embedding_dim,
            "M1": num_classes + 4,
            **{name: student.stage_dims[-d] for name, d in depth.items() if name in self.features},
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

    def inputs(self, batch: Batch, view: StudentView) -> Tensor:
        """The teacher's input for each sample: the chosen feature groups, concatenated."""
        parts = []
        for name in self.features:
            if name == "I0":
                parts.append(view.features)
            elif name in ("I1", "I2", "I3"):
                parts.append(_pooled(view.maps[-int(name[1])]))
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


def _pooled(states: Tensor) -> Tensor:
    """Average over the spatial positions of (N, C, H, W) maps; flat states pass through."""
    return states.flatten(2).mean(dim=2) if states.dim() > 2 else states
