"""Checkpoints that survive a crash at any moment.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, and renamed over the old one: a reader sees either the previous
checkpoint or the new one, never half of one. Loading uses
``weights_only=True``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from metateach.errors import CheckpointError, first_line

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_path", "LAST", "BEST"]

LAST = "last.pt"
BEST = "best.pt"


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or the ``checkpoints/last.pt`` of a run folder."""
    path = Path(path)
    return path / "checkpoints" / LAST if path.is_dir() else path


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (or a run folder's last one) onto the CPU.

    Raises:
        CheckpointError: the file is missing or is not a metateach checkpoint.
    """
    file = checkpoint_path(path)
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint not found: {file} (train.resume takes a .pt file or a run folder)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {file}: {first_line(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "progress" not in state:
        raise CheckpointError(f"{file} is not a metateach checkpoint")
    return state
