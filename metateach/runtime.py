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


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and PyTorch; optionally insist on deterministic kernels.

    On the CPU this makes a run bit-for-bit repeatable for a given thread
    count. On CUDA, cuBLAS needs a fixed workspace for that, set here before
    the first CUDA call; ops with no deterministic kernel warn.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
