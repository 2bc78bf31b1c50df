"""Checkpoints that survive a crash at any moment, and what a run's checkpoint holds.

A checkpoint is written to a temporary file in the same folder, flushed to
disk, and renamed over the old one: a reader sees either the previous
checkpoint or the new one, never half of one. Loading uses
``weights_only=True``, so a checkpoint cannot run code.

:func:`run_state` and :func:`restore_run` are the two sides of a run's
checkpoint, side by side so that they stay each other's inverse: the
weights, every optimizer's state, the teaching strategy's, the run's
progress and its random state, so that a resumed run is the same run.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metateach.config import config_to_dict
from metateach.errors import CheckpointError, first_line
from metateach.progress import TrainState
from metateach.runtime import restore_rng_state, rng_state

if TYPE_CHECKING:
    from metateach.trainer import Trainer

__all__ = [
    "save_checkpoint",
    "remove_stale_writes",
    "load_checkpoint",
    "checkpoint_path",
    "run_state",
    "restore_run",
    "LAST",
    "BEST",
]

#: The layout of a run's checkpoint (:func:`run_state`); another is refused, not guessed at.
FORMAT = 1
LAST = "last.pt"
#: The ending of a checkpoint being written (``.last.pt.<pid>.tmp``), renamed into place when whole.
TMP = ".tmp"
BEST = "best.pt"


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint file, or the ``checkpoints/last.pt`` of a run folder."""
    path = Path(path)
    return path / "checkpoints" / LAST if path.is_dir() else path


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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
    except OSError as e:
        kept = "the previous one is intact" if path.is_file() else "there is no earlier one"
        raise CheckpointError(
            f"cannot write checkpoint {path}: {e.strerror or first_line(e)} ({kept})"
        ) from None
    return path


def remove_stale_writes(folder: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes cut short in ``folder``; return them.

    Only for a folder whose run lock is held: no other process can be writing there.
    """
    stale = sorted(folder.glob(f".*{TMP}"))
    for file in stale:
        file.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint (or a run folder's last one) onto the CPU.

    Raises:
        CheckpointError: the file is missing or is not a metateach checkpoint.
    """
    file = checkpoint_path(path)
    if not file.is_file() and Path(path).is_dir():
        raise CheckpointError(
            f"run folder {path} holds no checkpoint: its run stopped before saving one; "
            "delete the folder to start that run again"
        )
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
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {file} has format {state.get('format')!r}; this metateach reads format "
            f"{FORMAT} (a newer metateach wrote it, or it was not written by metateach)"
        )
    if "config" not in state:
        raise CheckpointError(f"checkpoint {file} is damaged: it has no 'config' (its experiment)")
    try:
        TrainState.from_dict(state["progress"])
    except (TypeError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {file} is damaged: its progress record does not fit ({type(e).__name__}: "
            f"{first_line(e)})"
        ) from None
    return state


def run_state(trainer: Trainer, weights_only: bool = False) -> dict[str, Any]:
    """What ``trainer``'s run needs to continue exactly; with ``weights_only``, its weights and progress.

    Collective under torchrun (every rank's random state is gathered): call it on every rank.
    """
    teaching = trainer.teaching
    checkpoint: dict[str, Any] = {
        "format": FORMAT,
        "config": config_to_dict(trainer.cfg),
        "model": trainer.model.state_dict(),
        "progress": asdict(trainer.state),
    }
    if teaching.teacher is not None:
        checkpoint["teacher"] = teaching.teacher.state_dict()
    if weights_only:
        return checkpoint
    checkpoint["optimizer"] = trainer.optimizer.state_dict()
    checkpoint["teaching"] = {
        "optimizer": None if teaching.optimizer is None else teaching.optimizer.state_dict(),
        "strategy": teaching.strategy.state_dict(),
        "loss_average": float(trainer.loss_average.value),
        "grad_norm": teaching.strategy.problem.grad_norm,
    }
    checkpoint["rng"] = rng_state(trainer.world)
    checkpoint["wandb_id"] = trainer.logger.wandb_id
    if trainer.diagnostics is not None:
        checkpoint["diagnostics"] = trainer.diagnostics.state_dict()
    return checkpoint


def restore_run(trainer: Trainer, checkpoint: dict[str, Any]) -> None:
    """Put ``trainer`` where :func:`run_state` found its run.

    Raises:
        CheckpointError: the checkpoint holds weights only, or does not fit the run's networks.
    """
    if "optimizer" not in checkpoint:
        raise CheckpointError(
            "this checkpoint holds weights only (best.pt); resume from checkpoints/last.pt"
        )
    teaching = trainer.teaching
    try:
        trainer.model.load_state_dict(checkpoint["model"])
        _load_optimizer(trainer.optimizer, checkpoint["optimizer"])
        if teaching.teacher is not None:
            teaching.teacher.load_state_dict(checkpoint["teacher"])
        if teaching.optimizer is not None:
            _load_optimizer(teaching.optimizer, checkpoint["teaching"]["optimizer"])
        teaching.strategy.load_state_dict(checkpoint["teaching"]["strategy"])
        trainer.loss_average.value.fill_(checkpoint["teaching"]["loss_average"])
        grad_norm = checkpoint["teaching"].get("grad_norm")  # absent from older checkpoints
        teaching.strategy.problem.grad_norm = (
            None if grad_norm is None else grad_norm.to(trainer.device)
        )
        if trainer.diagnostics is not None and "diagnostics" in checkpoint:
            trainer.diagnostics.load_state_dict(checkpoint["diagnostics"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not fit this run: {_one_line(e)}") from None
    trainer.state = TrainState.from_dict(checkpoint["progress"])
    restore_rng_state(checkpoint["rng"], trainer.world)


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer's state; its parameter groups keep the settings the config gave them.

    The same settings as saved on a plain resume (the experiment must match);
    the new ones when ``train.resume_with_changes`` lets them differ.
    """
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, settings, strict=True):
        group.update(kept)


def _one_line(problem: Exception) -> str:
    """A load error in one line: ``load_state_dict`` puts its heading and each mismatch on lines of their own."""
    lines = [line.strip() for line in str(problem).strip().splitlines() if line.strip()]
    if not lines:
        return type(problem).__name__
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more
