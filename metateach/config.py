"""The typed configuration of an experiment.

A run is described by one :class:`ExperimentConfig`: nested dataclasses,
one per concern. YAML files fill them, ``key=value`` overrides adjust them,
and anything unknown or of the wrong type is an error naming the key.

A YAML file may build on others with a ``base:`` entry (a path, or a list of
paths, relative to the file); the file's own values win::

    base: base/cifar10_resnet32.yaml
    noise: {type: flip2, rate: 0.4}
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from metateach.errors import ConfigError, first_line

__all__ = [
    "DataConfig",
    "NoiseConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TeacherConfig",
    "LoggingConfig",
    "ExperimentConfig",
    "load_config",
    "config_to_dict",
    "WANDB_MODES",
]

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class DataConfig:
    """Which data set, where it lives, and how it is split."""

    name: str = "digits"
    #: Folder holding the data set; unset means $METATEACH_DATA, then ./data.
    #: For ``imagefolder`` it is the tree holding ``train/`` and ``test/``.
    root: str | None = None
    #: Let torchvision download a missing data set (never done unless asked).
    download: bool = False
    #: Clean validation samples taken from the training set, class-balanced;
    #: unset means the data set's usual size (5,000 on CIFAR and MNIST).
    val_size: int | None = None
    #: Keep only this many training samples (after the validation split).
    train_subset: int | None = None
    #: Keep only this many test samples.
    test_subset: int | None = None
    #: Apply the data set's standard augmentation to training batches.
    augment: bool = True
    #: ``imagefolder`` only: resize every image to this square size.
    image_size: int | None = None
    #: Seed of the split and the subsets; fixed apart from the training seed
    #: so that runs with different seeds see the same data.
    seed: int = 0


@dataclass
class NoiseConfig:
    """How the training split is corrupted. Validation and test stay clean."""

    type: str = "none"
    rate: float = 0.0
    #: Long-tailed class imbalance: largest class / smallest class (1 = none).
    imbalance_factor: float = 1.0
    seed: int = 0


@dataclass
class ModelConfig:
    """The student network."""

    name: str = "mlp"
    #: Extra constructor arguments of the chosen model, e.g. ``{hidden: [256]}``.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """The student's optimizer. Weight decay is coupled (PyTorch's convention)."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    """The learning rate as a function of the (fractional) epoch."""

    name: str = "step"
    #: ``step``: epochs at which the rate is multiplied by ``gamma``.
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    #: ``cosine``: the rate it decays to.
    min_lr: float = 0.0
    #: Linear warm-up from 0 over this many epochs (any schedule).
    warmup_epochs: float = 0.0


@dataclass
class TrainConfig:
    """The loop: how long, how big, where, and how to recover."""

    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 500
    seed: int = 0
    #: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: Deterministic kernels (bit-exact on the CPU; slower on CUDA).
    deterministic: bool = True
    #: CPU threads for PyTorch; unset keeps PyTorch's default.
    threads: int | None = None
    #: Run folders are created under this directory.
    out_dir: str = "runs"
    #: The run folder's name; unset means ``<config>-<timestamp>``.
    run_name: str | None = None
    #: A checkpoint (or a run folder) to continue from.
    resume: str | None = None
    #: Also checkpoint every this many steps (the end of an epoch always is).
    checkpoint_every_steps: int | None = None
    #: tqdm progress bars.
    progress: bool = True


@dataclass
class TeacherOptimConfig(OptimConfig):
    """The teacher's optimizer (Adam at 1e-3 unless set)."""

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class HypergradConfig:
    """How a hypergradient teacher learns; unset values keep the teacher's own declaration."""

    #: ``unrolled``, ``reversible``, ``lookahead``, ``finite_difference`` or ``implicit``.
    method: str | None = None
    #: K: student steps per teacher step.
    inner_steps: int | None = None
    #: B <= K: student steps the hypergradient looks back through.
    backprop_steps: int | None = None
    #: Let gradients flow through the lesson's dependence on the student (dw/dtheta kept).
    keep_weight_grad: bool | None = None
    #: Clean validation samples per teacher step.
    val_batch_size: int = 100
    #: The method's own settings, e.g. ``{solver: neumann, iterations: 20}`` for ``implicit``.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """Who guides the student. ``none`` trains the student alone."""

    name: str = "none"
    #: Extra constructor arguments of the chosen teacher.
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Let a learning teacher learn; false keeps it as it is (e.g. loaded from ``checkpoint``).
    learn: bool = True
    #: A metateach checkpoint whose teacher weights to load.
    checkpoint: str | None = None
    optim: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)
    hypergrad: HypergradConfig = field(default_factory=HypergradConfig)


@dataclass
class LoggingConfig:
    """Weights & Biases and the local metrics file."""

    #: ``offline`` (default; upload later with ``wandb sync``), ``online`` or ``disabled``.
    wandb: str = "offline"
    project: str = "metateach"
    entity: str | None = None
    #: W&B run name; unset means the run folder's name.
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    #: Log the running training loss every this many steps.
    every_steps: int = 50
    #: Draw the noise matrix and the training curves as PNGs.
    plots: bool = True
    #: With a teacher: each epoch, its weights on a fixed sample of training data
    #: (shares on clean and mislabeled samples); at the end, the deep-interaction
    #: paper's Figure 2 (weight against loss, t-SNE of the states, weight histogram).
    diagnostics: bool = True
    #: Training samples the diagnostics look at.
    diagnostic_samples: int = 2000


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Your own code to import before names are looked up: modules (``my_lab.teachers``)
    #: or files (``teachers/mine.py``) whose ``@TEACHERS.register`` etc. add entries.
    plugins: list[str] = field(default_factory=list)
    #: The file this configuration was read from (set by :func:`load_config`).
    source: str | None = None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Read a YAML experiment (with its bases), apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: a missing file, an unknown key, a value of the wrong type
            or out of range, or an unknown registry name.
    """
    merged = OmegaConf.structured(ExperimentConfig)
    if path is not None:
        merged = _merge(merged, _read_with_bases(Path(path), ()), f"config file {path}")
        merged.source = str(path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.epochs=5")
    merged = _merge(merged, OmegaConf.from_dotlist(list(overrides)), "overrides")
    cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    import_plugins(cfg.plugins)
    validate(cfg)
    return cfg


def import_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin, a module name or a ``.py`` file, once."""
    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                _import_file(Path(plugin))
            else:
                importlib.import_module(plugin)
        except ConfigError:
            raise
        except Exception as e:  # whatever the plugin's own code raises
            raise ConfigError(
                f"plugin {plugin!r} (plugins) failed: {type(e).__name__}: {first_line(e)}"
            ) from None


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"plugin file not found: {path} (plugins)")
    name = "metateach_plugins." + path.resolve().with_suffix("").as_posix().strip("/").replace(
        "/", "."
    )
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dicts, ready for YAML, JSON, W&B or a checkpoint."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """The file's content on top of its ``base:`` files, recursively."""
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"config file {path} builds on itself through 'base:'")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(content, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(content).__name__}"
        )
    bases = content.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for base in bases:
        base_cfg = _read_with_bases(path.parent / base, (*chain, resolved))
        merged = OmegaConf.merge(merged, base_cfg)
    return OmegaConf.merge(merged, OmegaConf.create(content))


def _merge(schema: DictConfig, update: DictConfig, origin: str) -> DictConfig:
    """Merge ``update`` into the typed ``schema``, turning OmegaConf's errors into one line."""
    try:
        return OmegaConf.merge(schema, update)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e, origin)) from None
    except ValidationError as e:
        raise ConfigError(
            f"{origin}: wrong type for {e.full_key or '?'}: {first_line(e.msg)}"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: {first_line(e.msg or e)}") from None


def _unknown_key_message(e: ConfigKeyError, origin: str) -> str:
    key = str(e.full_key)
    parent, _, _ = key.rpartition(".")
    section: Any = ExperimentConfig()
    for part in parent.split(".") if parent else []:
        section = getattr(section, part, None)
    valid = (
        ", ".join(vars(section))
        if section is not None and hasattr(section, "__dataclass_fields__")
        else ""
    )
    where = f"'{parent}'" if parent else "the top level"
    return f"{origin}: unknown key {key!r}; valid keys in {where}: {valid}"


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
    ("noise.rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("noise.imbalance_factor", *_at_least(1)),
    ("data.val_size", *_at_least(0, optional=True)),
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
    ("train.threads", *_at_least(1, optional=True)),
    (
        "train.device",
        lambda v: v in ("auto", "cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", v) is not None,
        "auto, cpu, cuda, cuda:N or mps",
    ),
    ("logging.wandb", lambda v: v in WANDB_MODES, f"one of {', '.join(WANDB_MODES)}"),
    ("logging.every_steps", *_at_least(1)),
    ("logging.diagnostic_samples", *_at_least(1)),
    ("teacher.hypergrad.inner_steps", *_at_least(1, optional=True)),
    ("teacher.hypergrad.backprop_steps", *_at_least(1, optional=True)),
    ("teacher.hypergrad.val_batch_size", *_at_least(1)),
    ("teacher.optim.lr", lambda v: v > 0, "> 0"),
    ("teacher.optim.weight_decay", *_at_least(0)),
    ("teacher.optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
]


def validate(cfg: ExperimentConfig) -> None:
    """Check names against the registries and values against their ranges."""
    from metateach.registry import (
        DATASETS,
        MODELS,
        NOISES,
        OPTIMIZERS,
        SCHEDULES,
        TEACHERS,
        check_options,
    )

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
    for key, ok, what in _RANGES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if not ok(value):
            raise ConfigError(f"{key} must be {what}, got {value!r}")
    if cfg.noise.type == "none" and cfg.noise.rate != 0:
        raise ConfigError(
            f"noise.rate={cfg.noise.rate} needs a noise.type to corrupt labels (it is 'none')"
        )
    _validate_teacher(cfg)


def _validate_teacher(cfg: ExperimentConfig) -> None:
    """The teacher's options, and a learning setup the engine can run."""
    from metateach.registry import HYPERGRADS, TEACHERS, check_options
    from metateach.teacher import (
        ExampleGradient,
        Hypergradient,
        PolicyGradient,
        Teacher,
        effective_learning,
    )

    teacher = cfg.teacher
    builder = TEACHERS.get(teacher.name)
    check_options(
        builder,
        teacher.kwargs,
        f"teacher {teacher.name!r}",
        "teacher.kwargs",
        exclude=TEACHER_CONTEXT,
    )
    learning = effective_learning(teacher)
    if (
        isinstance(learning, PolicyGradient)
        and getattr(builder, "episode_reward", None) is Teacher.episode_reward
    ):
        raise ConfigError(
            f"teacher {teacher.name!r} learns by policy gradient but defines no episode_reward()"
        )
    if isinstance(learning, Hypergradient | ExampleGradient) and cfg.optim.name != "sgd":
        raise ConfigError(
            f"teacher {teacher.name!r} differentiates the student's momentum SGD: set optim.name=sgd "
            f"(got {cfg.optim.name})"
        )
    asked = [
        k for k, v in vars(teacher.hypergrad).items() if k in HYPERGRAD_KEYS and v not in (None, {})
    ]
    if not isinstance(learning, Hypergradient):
        if asked and teacher.learn:
            raise ConfigError(
                f"teacher.hypergrad.{asked[0]} is set, but teacher {teacher.name!r} does not learn by hypergradient"
            )
        return
    check_options(
        HYPERGRADS.get(learning.method),
        learning.options,
        f"hypergradient method {learning.method!r}",
        "teacher.hypergrad.options",
        exclude={"problem": None, "inner_steps": None, "backprop_steps": None},
    )
    if learning.backprop_steps > learning.inner_steps:
        raise ConfigError(
            f"teacher.hypergrad.backprop_steps (B={learning.backprop_steps}) must not exceed "
            f"teacher.hypergrad.inner_steps (K={learning.inner_steps})"
        )
    if learning.method == "reversible" and (cfg.optim.momentum <= 0 or cfg.optim.nesterov):
        raise ConfigError(
            "teacher.hypergrad.method=reversible runs momentum SGD backwards: it needs "
            "optim.momentum > 0 and optim.nesterov=false"
        )


#: What a teacher's builder may ask for besides its options (``teacher.kwargs``).
TEACHER_CONTEXT = {"num_classes": None, "student": None}
HYPERGRAD_KEYS = ("method", "inner_steps", "backprop_steps", "keep_weight_grad", "options")
