"""Checks of a loaded configuration: names against the registries, values against their ranges,
and a teacher's learning setup against what the engine can run. Each failure is one
:class:`~metateach.errors.ConfigError` line naming the key."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from metateach.errors import ConfigError, check_folder_name, first_line
from metateach.learning import configured_learning
from metateach.optim.optimizers import COMMON_SETTINGS, rule_from_config
from metateach.registry import (
    DATASETS,
    MODELS,
    NOISES,
    OPTIMIZERS,
    SCHEDULES,
    TEACHERS,
    check_options,
)

if TYPE_CHECKING:
    from metateach.config import ExperimentConfig

#: ``logging.wandb``'s values.
WANDB_MODES = ("offline", "online", "disabled")
#: How a teacher's view of the student's average training loss
#: (``TeachingContext.avg_train_loss``) averages the batch losses (``teacher.loss_average``).
LOSS_AVERAGES = {
    "mean": "the mean of every batch loss since the student's first step",
    "ema": "an exponential moving average, 0.9 old + 0.1 new (the first loss to start)",
}

__all__ = ["validate", "TEACHER_CONTEXT"]


def _at_least(bound: float, optional: bool = False) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: (optional and v is None) or (v is not None and v >= bound)), f">= {bound:g}"


#: Every range check: the key, a test of its value, and what a valid value is.
_RANGES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("optim.lr", lambda v: v > 0, "> 0"),
    ("optim.weight_decay", *_at_least(0)),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    (
        "optim.betas",
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
        "a pair [beta1, beta2] in [0, 1)",
    ),
    ("optim.sam.rho", *_at_least(0)),
    ("noise.rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("noise.imbalance_factor", *_at_least(1)),
    ("data.val_size", *_at_least(0, optional=True)),
    ("data.train_half", lambda v: v in (None, 0, 1), "0 or 1 (or unset: all)"),
    ("data.train_subset", *_at_least(1, optional=True)),
    ("data.test_subset", *_at_least(1, optional=True)),
    ("data.image_size", *_at_least(1, optional=True)),
    ("schedule.gamma", lambda v: v > 0, "> 0"),
    ("schedule.min_lr", *_at_least(0)),
    ("schedule.warmup_epochs", *_at_least(0)),
    ("train.epochs", *_at_least(1)),
    ("train.batch_size", *_at_least(1)),
    ("train.eval_batch_size", *_at_least(1)),
    ("train.checkpoint_every_steps", *_at_least(1, optional=True)),
    ("train.eval_every_steps", *_at_least(1, optional=True)),
    ("train.episodes", *_at_least(1)),
    ("train.target_val_acc", lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    ("train.threads", *_at_least(1, optional=True)),
    (
        "train.device",
        lambda v: v in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", v) is not None,
        "auto, cpu, cuda, cuda:N or mps",
    ),
    ("logging.wandb", lambda v: v in WANDB_MODES, f"one of {', '.join(WANDB_MODES)}"),
    ("logging.every_steps", *_at_least(1)),
    ("logging.diagnostic_samples", *_at_least(1)),
    ("logging.table_epochs", lambda v: 0 not in v, "epochs counted from 1, or from -1 at the end"),
    ("teacher.hypergrad.inner_steps", *_at_least(1, optional=True)),
    ("teacher.hypergrad.backprop_steps", *_at_least(1, optional=True)),
    (
        "teacher.hypergrad.val_batch_size",
        lambda v: v == "all" or (isinstance(v, int) and v >= 1),
        "an integer >= 1, or all",
    ),
    ("teacher.loss_average", lambda v: v in (None, *LOSS_AVERAGES), "mean or ema (or unset)"),
    ("teacher.optim.lr", lambda v: v > 0, "> 0"),
    ("teacher.optim.weight_decay", *_at_least(0)),
    ("teacher.optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("teacher.optim.sam.rho", lambda v: v == 0, "0 (SAM is for the student: optim.sam)"),
]


def validate(cfg: ExperimentConfig) -> None:
    """Check names against the registries and values against their ranges."""
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
    for registry, name in [
        (DATASETS, cfg.data.name),
        (NOISES, cfg.noise.type),
        (OPTIMIZERS, cfg.optim.name),
        (SCHEDULES, cfg.schedule.name),
        (TEACHERS, cfg.teacher.name),
        (OPTIMIZERS, cfg.teacher.optim.name),
    ]:
        registry.get(name)
    check_options(
        MODELS.get(cfg.model.name),
        cfg.model.kwargs,
        f"model {cfg.model.name!r}",
        "model.kwargs",
        exclude={"num_classes": None, "in_shape": None},
    )
    for key, section in (("optim", cfg.optim), ("teacher.optim", cfg.teacher.optim)):
        check_options(
            OPTIMIZERS.get(section.name),
            section.kwargs,
            f"optimizer {section.name!r}",
            f"{key}.kwargs",
            exclude=dict.fromkeys(COMMON_SETTINGS),
        )
        try:
            rule_from_config(section)
        except ValueError as e:  # settings the optimizer refuses (Nesterov without momentum, ...)
            raise ConfigError(f"{key}.name={section.name}: {first_line(e)}") from None
    for key, ok, what in _RANGES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{key} must be {what}, got {value!r}")
    if cfg.train.run_name is not None:
        check_folder_name(cfg.train.run_name, "train.run_name")
    _validate_changes(cfg)
    if cfg.noise.type == "none" and cfg.noise.rate != 0:
        raise ConfigError(
            f"noise.rate={cfg.noise.rate} needs a noise.type to corrupt labels (it is 'none')"
        )
    if cfg.train.stop_at_target and cfg.train.target_val_acc is None:
        raise ConfigError(
            "train.stop_at_target needs train.target_val_acc, the accuracy to stop at"
        )
    _validate_teacher(cfg)


def _validate_changes(cfg: ExperimentConfig) -> None:
    """``train.resume_with_changes``: only with ``train.resume``, and each entry a setting."""
    changes = cfg.train.resume_with_changes
    if changes and not cfg.train.resume:
        raise ConfigError(
            f"train.resume_with_changes={changes} changes a resumed run, but train.resume is unset"
        )
    for key in changes:
        node: Any = cfg
        for part in key.split("."):
            if isinstance(node, dict):  # inside kwargs or options: any key of the thing's own
                break
            if not dataclasses.is_dataclass(node) or not hasattr(node, part):
                valid = (
                    ", ".join(f.name for f in dataclasses.fields(node))
                    if dataclasses.is_dataclass(node)
                    else ""
                )
                raise ConfigError(
                    f"train.resume_with_changes: {key!r} names no setting"
                    + (f" ({part!r} is not among {valid})" if valid else "")
                )
            node = getattr(node, part)


def _numbers(section: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Every number of a config's sections (and of their lists), with its key."""
    for item in dataclasses.fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{key}.")
        elif isinstance(value, float):
            yield key, value
        elif isinstance(value, list | tuple):
            yield from ((key, v) for v in value if isinstance(v, float))


def _validate_teacher(cfg: ExperimentConfig) -> None:
    """The teacher's options, and a learning setup the engine can run."""

    teacher = cfg.teacher
    builder = TEACHERS.get(teacher.name)
    check_options(
        builder,
        teacher.kwargs,
        f"teacher {teacher.name!r}",
        "teacher.kwargs",
        exclude=TEACHER_CONTEXT,
    )
    learning = configured_learning(teacher)
    how = "is no teacher" if teacher.name == "none" else learning.how
    if teacher.refill and not learning.fills_batches:
        raise ConfigError(
            f"teacher.refill fills batches with the samples a filter keeps: teacher {teacher.name!r} "
            f"{how}; use a fixed or policy-gradient filter (l2t, random_filter, self_paced)"
        )
    if cfg.train.episodes > 1 and not learning.over_episodes:
        raise ConfigError(
            f"train.episodes={cfg.train.episodes} trains one teacher over several students, which "
            f"only a learning policy-gradient teacher (l2t) learns from; teacher {teacher.name!r} "
            "does not"
        )
    if learning.differentiates_step and cfg.optim.sam.rho > 0:
        raise ConfigError(
            f"teacher {teacher.name!r} differentiates the student's optimizer step, not SAM's "
            f"two-pass step: set optim.sam.rho=0 (got {cfg.optim.sam.rho})"
        )
    for section, (keys, means, users) in SECTIONS.items():
        settings = getattr(teacher, section)
        asked = [k for k in keys if getattr(settings, k) not in (None, {})]
        if asked and teacher.learn and section != learning.section:
            key = f"teacher.{section}.{asked[0]}"
            home = f"; its settings go in teacher.{learning.section}" if learning.section else ""
            raise ConfigError(
                f"{key} is set, but teacher {teacher.name!r} does not {means} (it {how}{home}): "
                f"remove {key}, or pick a teacher that does ({users})"
            )
    learning.check(cfg)


#: What a teacher's builder may ask for besides its options (``teacher.kwargs``):
#: what :func:`metateach.teaching.build_teaching` offers.
TEACHER_CONTEXT = dict.fromkeys(
    ("num_classes", "student", "new_student", "noise_rate", "train_size", "target_val_acc")
)
#: Each teacher.<section> that adjusts a declaration: its settings, what they tune, who reads them.
SECTIONS = {
    "hypergrad": (
        ("method", "inner_steps", "backprop_steps", "keep_weight_grad", "options"),
        "learn by hypergradient",
        "meta_weight_net, deep_interaction, l2t_dln, ...",
    ),
    "policy": (
        ("baseline_decay", "exploration", "noise_std", "mirrored"),
        "learn by REINFORCE",
        "l2t",
    ),
}
