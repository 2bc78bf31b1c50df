"""Assemble a run's teacher, the bilevel problem and the strategy that drives them, from a config."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from metateach.checkpoint import load_checkpoint
from metateach.config import ExperimentConfig
from metateach.data import BatchStream, DataBundle, derive_seed
from metateach.engine import BilevelProblem, TeachingStrategy
from metateach.errors import CheckpointError, ConfigError, first_line
from metateach.learning import FixedRule, configured_learning
from metateach.models import model_for
from metateach.optim import optimizer_from_config
from metateach.registry import TEACHERS
from metateach.student import Student
from metateach.teacher import Teacher

__all__ = ["Teaching", "build_teaching"]


@dataclass
class Teaching:
    """The teacher (or None), its optimizer (when it learns), and the strategy the trainer runs."""

    teacher: Teacher | None
    optimizer: torch.optim.Optimizer | None
    strategy: TeachingStrategy


def build_teaching(
    cfg: ExperimentConfig,
    student: Student,
    student_optimizer: torch.optim.Optimizer,
    data: DataBundle,
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
) -> Teaching:
    """Build ``cfg.teacher`` for ``student`` and the strategy that teaches with it.

    ``shard`` (rank, processes): the part of each validation and refill
    batch this process takes under data-parallel training.
    """
    settings = cfg.teacher
    try:
        teacher = TEACHERS.build(
            settings.name,
            settings.kwargs,
            "teacher.kwargs",
            num_classes=data.num_classes,
            student=student,
            # A fresh network of the student's kind, initialized anew (a peer student).
            new_student=lambda: model_for(cfg.model, data),
            noise_rate=cfg.noise.rate,
            train_size=len(data.train),
            target_val_acc=cfg.train.target_val_acc,
        )
    except ConfigError:  # an unknown name or option: already a one-line error naming its key
        raise
    except ValueError as e:  # a teacher that cannot work with these options or this student
        raise ConfigError(
            f"teacher {settings.name!r} (teacher.name) with teacher.kwargs={settings.kwargs}: {e}"
        ) from None
    if teacher is not None:
        teacher.to(device)
        if settings.checkpoint:
            load_teacher_weights(teacher, settings.checkpoint)
    # Without a teacher there is nothing to learn, whatever the settings say.
    learning = configured_learning(settings) if teacher is not None else FixedRule()
    trainable = [p for p in teacher.parameters() if p.requires_grad] if teacher is not None else []
    problem = BilevelProblem(
        student=student,
        optimizer=student_optimizer,
        teacher=teacher,
        teacher_optimizer=optimizer_from_config(learning.optimizer_config(cfg), trainable)
        if learning.learns and trainable
        else None,
        # Its own seed: the validation batches do not shift the training order.
        val_stream=data.val_stream(
            settings.hypergrad.val_batch_size,
            derive_seed(cfg.train.seed, 1),
            device,
            shard,
            chunk_size=cfg.train.eval_batch_size,
        )
        if learning.reads_validation
        else None,
        clean_targets=data.train.clean_targets.to(device),
        keep_weight_grad=learning.keep_weight_grad,
        refill=BatchStream(
            data.train_loader(cfg.train.batch_size, derive_seed(cfg.train.seed, 3), device, shard)
        )
        if settings.refill and teacher is not None
        else None,
    )
    strategy = learning.strategy(problem, seed=derive_seed(cfg.train.seed, 4))
    return Teaching(teacher, problem.teacher_optimizer, strategy)


def load_teacher_weights(teacher: Teacher, path: str) -> None:
    """Load the teacher of a metateach checkpoint (``teacher.checkpoint``).

    A teacher moved to a data set with another number of classes keeps its
    fresh initialization for the tensors it declares :attr:`Teacher.per_class`
    (a label embedding) when their shapes differ, and says so in a warning;
    any other mismatch is an error.
    """
    state = load_checkpoint(path)
    if state.get("teacher") is None:
        raise CheckpointError(f"checkpoint {path} holds no teacher (teacher.checkpoint)")
    saved = dict(state["teacher"])
    own = teacher.state_dict()
    fresh = [
        name
        for name in teacher.per_class
        if name in saved and name in own and saved[name].shape != own[name].shape
    ]
    for name in fresh:
        saved[name] = own[name]
    if fresh:
        warnings.warn(
            f"teacher.checkpoint {path}: {', '.join(fresh)} re-initialized, not loaded "
            "(one row per class, and this data set has another number of classes)",
            stacklevel=2,
        )
    try:
        teacher.load_state_dict(saved)
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(
            f"teacher in {path} does not fit this teacher: {first_line(e)}"
        ) from None
