"""Wide residual networks for 32x32 images.

References:
    Zagoruyko and Komodakis, "Wide residual networks", BMVC 2016:
    pre-activation blocks in three stages of 16k, 32k and 64k filters;
    WRN-28-10 has 36.5M parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metateach.registry import MODELS
from metateach.student import Student

__all__ = ["WideResNet"]


class _WideBlock(nn.Module):
    """Pre-activation BN-ReLU-conv-(dropout)-BN-ReLU-conv with a 1x1 projection when shapes change."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.project = (
            nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        shortcut = x if self.project is None else self.project(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + shortcut


class WideResNet(Student):
    """WRN-depth-widen for 32x32 images."""

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_shape: tuple[int, int, int] = (3, 32, 32),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.num_classes = num_classes
        self.feature_dim = widths[-1]
        _, height, width = in_shape
        self.map_shapes = tuple(
            (planes, -(-height // 2**i), -(-width // 2**i)) for i, planes in enumerate(widths)
        )
        self.conv = nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)
        layers, in_planes = [], 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(_WideBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, dropout))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(widths[-1])
        self.classifier = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stages(self, x: Tensor) -> tuple[Tensor, ...]:
        s1 = self.layer1(self.conv(x))
        s2 = self.layer2(s1)
        # The last stage's maps are taken after the final BN-ReLU, as the head sees them.
        s3 = F.relu(self.bn(self.layer3(s2)))
        return s1, s2, s3

    def pool(self, last_map: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(last_map, 1).flatten(1)


@MODELS.register("wrn28_10")
def wrn28_10(
    num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32), dropout: float = 0.0
) -> WideResNet:
    """WRN-28-10 (Zagoruyko and Komodakis, 2016), as in MW-Net and the deep-interaction paper."""
    return WideResNet(28, 10, num_classes, in_shape, dropout)


@MODELS.register("wide_resnet")
def wide_resnet(
    num_classes: int,
    in_shape: tuple[int, int, int] = (3, 32, 32),
    depth: int = 28,
    widen: int = 10,
    dropout: float = 0.0,
) -> WideResNet:
    """Wide ResNet of any depth 6n+4 and width factor."""
    return WideResNet(depth, widen, num_classes, in_shape, dropout)
