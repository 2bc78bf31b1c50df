"""Batched augmentation and normalization of uint8 image tensors.

Working on a whole batch at once (and on the GPU when there is one) keeps
the data path far below the cost of a student step; per-image PIL
transforms would not be.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip", "Normalize", "channel_stats"]


def random_crop_flip(
    images: Tensor, padding: int, flip: bool, generator: torch.Generator
) -> Tensor:
    """Zero-pad by ``padding``, crop back to size at a random offset, mirror half the images.

    The standard CIFAR augmentation (He et al., 2016) when ``padding=4, flip=True``.
    Random numbers come from ``generator`` (a CPU generator), so a batch's
    augmentation depends on nothing but its seed.
    """
    n, c, h, w = images.shape
    device = images.device
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(device)
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


class Normalize:
    """uint8 images -> float32, per channel ``(x / 255 - mean) / std``."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        self.mean = mean.float().reshape(1, -1, 1, 1)
        self.std = std.float().reshape(1, -1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255.0 - self.mean) / self.std


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of uint8 images (N, C, H, W) scaled to [0, 1].

    Summed in chunks, so that no float copy of the whole set is made.
    """
    channels = images.shape[1]
    if len(images) == 0:
        return torch.zeros(channels), torch.ones(channels)
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].double() / 255.0
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = images.numel() // channels
    mean = total / count
    var = (squares / count - mean.square()).clamp(min=0) * count / max(count - 1, 1)
    return mean.float(), var.sqrt().clamp(min=1e-6).float()
