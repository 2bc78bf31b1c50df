"""A LeNet-style CNN for 28x28 grey images (MNIST, Fashion-MNIST).

References:
    LeCun, Bottou, Bengio and Haffner, "Gradient-based learning applied to
    document recognition", 1998; the widths (20 and 50 filters of 5x5, 500
    hidden units) are those of Caffe's LeNet, 431k parameters on MNIST.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metateach.registry import MODELS
from metateach.student import Student

__all__ = ["LeNet"]


class LeNet(Student):
    """conv5(20)-pool-conv5(50)-pool-fc(500)-head, ReLU activations.

    Its stages are the two pooled convolutions and fc; fc is the
    second-to-last layer (I0), so I1 is conv2's maps (50x4x4 on MNIST) and
    I2 conv1's (20x12x12). There is no I3.
    """

    levels = (-2, -3)

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        hidden: int = 500,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels, height, width = in_shape
        mid_h, mid_w = (height - 4) // 2, (width - 4) // 2
        out_h, out_w = (mid_h - 4) // 2, (mid_w - 4) // 2
        if out_h < 1 or out_w < 1:
            raise ValueError(f"LeNet needs images of at least 16x16, got {height}x{width}")
        self.num_classes = num_classes
        self.feature_dim = hidden
        self.map_shapes = ((20, mid_h, mid_w), (50, out_h, out_w), (hidden,))
        self.conv1 = nn.Conv2d(channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc = nn.Linear(50 * out_h * out_w, hidden)
        self.dropout = dropout
        self.classifier = nn.Linear(hidden, num_classes)

    def stages(self, x: Tensor) -> tuple[Tensor, ...]:
        c1 = F.max_pool2d(F.relu(self.conv1(x)), 2)
        c2 = F.max_pool2d(F.relu(self.conv2(c1)), 2)
        h = F.relu(self.fc(c2.flatten(1)))
        if self.dropout > 0:
            h = F.dropout(h, self.dropout, self.training)
        return c1, c2, h

    def pool(self, last_map: Tensor) -> Tensor:
        return last_map


@MODELS.register("lenet")
def lenet(
    num_classes: int,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    hidden: int = 500,
    dropout: float = 0.0,
) -> LeNet:
    """LeNet-style CNN for 28x28 images."""
    return LeNet(num_classes, in_shape, hidden, dropout)
