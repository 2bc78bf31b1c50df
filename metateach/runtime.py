"""Where a run computes and how it is made repeatable."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from metateach.errors import ConfigError

__all__ = ["resolve_device", "seed_everything"]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available here; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={name} but MPS is not available here; use auto or cpu")
    return device


def seed_everything(
    seed: int, deterministic: bool = True, device: torch.device | None = None
) -> None:
    """Seed Python, NumPy and PyTorch; with ``deterministic``, make CUDA kernels deterministic too.

    PyTorch's CPU kernels already give the same bits for the same inputs and
    thread count, and ``torch.use_deterministic_algorithms`` would make some
    of them (convolutions) several times slower, so it is turned on only
    for CUDA, together with the fixed cuBLAS workspace that needs.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    cuda = device is not None and device.type == "cuda"
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic and cuda, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
