"""The 9-layer CNN of co-teaching's experiments, on any of its image sizes (MNIST to CIFAR).

References:
    Han et al., "Co-teaching: Robust training of deep neural networks with
    extremely noisy labels", NeurIPS 2018, Table 3 (after Laine and Aila's
    temporal-ensembling network): three 3x3 convolutions of 128, max-pool,
    dropout 0.25; three of 256, max-pool, dropout 0.25; unpadded 3x3
    convolutions of 512, 256 and 128; global average pooling; a dense head.
    Every convolution is followed by BatchNorm and LeakyReLU (slope 0.01).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metateach.registry import MODELS
from metateach.student import Student

__all__ = ["CNN9"]


def _conv(in_channels: int, out_channels: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=padding),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.01),
    )


class CNN9(Student):
    """conv128 x3 - pool - conv256 x3 - pool - conv512, conv256, conv128 (unpadded) - average - head."""

    def __init__(
        self, num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32), dropout: float = 0.25
    ) -> None:
        super().__init__()
        channels, height, width = in_shape
        if min(height, width) // 4 < 7:
            raise ValueError(f"CNN9 needs images of at least 28x28, got {height}x{width}")
        self.num_classes = num_classes
        self.feature_dim = 128
        self.map_shapes = (
            (128, height, width),
            (256, height // 2, width // 2),
            (128, height // 4 - 6, width // 4 - 6),
        )
        self.dropout = dropout
        self.block1 = nn.Sequential(_conv(channels, 128, 1), _conv(128, 128, 1), _conv(128, 128, 1))
        self.block2 = nn.Sequential(_conv(128, 256, 1), _conv(256, 256, 1), _conv(256, 256, 1))
        self.block3 = nn.Sequential(_conv(256, 512, 0), _conv(512, 256, 0), _conv(256, 128, 0))
        self.classifier = nn.Linear(128, num_classes)

    def stages(self, x: Tensor) -> tuple[Tensor, ...]:
        h1 = self.block1(x)
        h = F.dropout2d(F.max_pool2d(h1, 2), self.dropout, self.training)
        h2 = self.block2(h)
        h = F.dropout2d(F.max_pool2d(h2, 2), self.dropout, self.training)
        return h1, h2, self.block3(h)

    def pool(self, last_map: Tensor) -> Tensor:
        return last_map.mean(dim=(2, 3))


@MODELS.register("cnn9")
def cnn9(
    num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32), dropout: float = 0.25
) -> CNN9:
    """Co-teaching's 9-layer CNN (Han et al. 2018, Table 3)."""
    return CNN9(num_classes, in_shape, dropout)
