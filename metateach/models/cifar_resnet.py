"""The ResNets of He et al. (2016) for 32x32 images.

References:
    He, Zhang, Ren and Sun, "Deep residual learning for image recognition",
    CVPR 2016, Section 4.2: 6n+2 layers in three stages of 16, 32 and 64
    filters, identity shortcuts with zero padding (option A). ResNet-32 has
    0.46M parameters, ResNet-110 1.7M.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from metateach.registry import MODELS
from metateach.student import Student

__all__ = ["CifarResNet"]


class _BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus an option-A shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        # Option A: subsample and pad the new channels with zeros; no parameters.
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            half = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Student):
    """ResNet-(6n+2) for CIFAR-sized images."""

    def __init__(
        self, depth: int, num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32)
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.feature_dim = 64
        _, height, width = in_shape
        self.map_shapes = tuple(
            (planes, -(-height // 2**i), -(-width // 2**i)) for i, planes in enumerate((16, 32, 64))
        )
        self.conv = nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        widths = (16, 32, 64)
        layers, in_planes = [], 16
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def stages(self, x: Tensor) -> tuple[Tensor, ...]:
        s1 = self.layer1(F.relu(self.bn(self.conv(x))))
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        return s1, s2, s3

    def pool(self, last_map: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(last_map, 1).flatten(1)


def _register_resnet(depth: int) -> None:
    def build(num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32)) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_shape)

    build.__doc__ = f"ResNet-{depth} for 32x32 images (He et al., 2016)."
    MODELS.register(f"resnet{depth}")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register_resnet(_depth)


@MODELS.register("cifar_resnet")
def cifar_resnet(
    num_classes: int, in_shape: tuple[int, int, int] = (3, 32, 32), depth: int = 32
) -> CifarResNet:
    """ResNet of any depth 6n+2."""
    return CifarResNet(depth, num_classes, in_shape)
