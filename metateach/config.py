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

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from metateach.errors import ConfigError, first_line
from metateach.plugins import import_plugins
from metateach.validation import LOSS_AVERAGES, SECTIONS, WANDB_MODES, validate

__all__ = [
    "DataConfig",
    "NoiseConfig",
    "ModelConfig",
    "OptimConfig",
    "SAMConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TeacherConfig",
    "LoggingConfig",
    "ExperimentConfig",
    "load_config",
    "config_to_dict",
    "flatten",
    "WANDB_MODES",
    "LOSS_AVERAGES",
    "PolicyConfig",
    "read_yaml",
    "check_overrides",
]


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
    #: Keep one half of the training samples (after the validation split), 0 or 1:
    #: L2T trains its teacher on one half and teaches new students on the other.
    train_half: int | None = None
    #: Keep only this many training samples (after the validation split and the half).
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
    #: Extra constructor arguments of the chosen model, e.g. ``{hidden: [256]}``
    #: (a file or override that names another model starts them afresh).
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SAMConfig:
    """Sharpness-Aware Minimization around the optimizer (Foret et al. 2021); off at rho 0."""

    #: The neighbourhood radius; 0 takes plain steps of the optimizer.
    rho: float = 0.0
    #: ASAM's scale-invariant neighbourhood (Kwon et al. 2021).
    adaptive: bool = False


@dataclass
class OptimConfig:
    """The student's optimizer: a rule of :mod:`metateach.optim.optimizers` (``sgd``, ``adam``,
    ``adamw``, ``rmsprop``, ``adagrad``, ``adadelta``). Weight decay is coupled (PyTorch's
    convention) except in ``adamw``."""

    name: str = "sgd"
    lr: float = 0.1
    #: SGD's and RMSprop's momentum.
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: SGD's Nesterov momentum.
    nesterov: bool = False
    #: Adam's and AdamW's.
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: What one optimizer alone takes: RMSprop's ``alpha`` and ``centered``, Adam's ``eps_root``,
    #: Adagrad's ``lr_decay`` and ``initial_accumulator_value``, Adadelta's ``rho``.
    kwargs: dict[str, Any] = field(default_factory=dict)
    sam: SAMConfig = field(default_factory=SAMConfig)


@dataclass
class ScheduleConfig:
    """The learning rate as a function of the (fractional) epoch."""

    name: str = "step"
    #: ``step``: epochs at which the rate is multiplied by ``gamma``;
    #: ``linear``: the first is the epoch the decay starts.
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    #: ``cosine`` and ``linear``: the rate it decays to.
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
    #: Repeatable runs. CPU kernels repeat already; on CUDA this picks deterministic (slower) ones.
    deterministic: bool = True
    #: CPU threads for PyTorch; unset keeps PyTorch's default.
    threads: int | None = None
    #: Keep memory the process frees for reuse (glibc's malloc, Linux): a step's
    #: tensors then reuse the last step's memory instead of faulting in fresh pages
    #: (:func:`metateach.runtime.keep_freed_memory`). Process-wide; false leaves malloc alone.
    keep_freed_memory: bool = True
    #: Run folders are created under this directory.
    out_dir: str = "runs"
    #: The run folder's name; unset means ``<config>-<timestamp>``.
    run_name: str | None = None
    #: A checkpoint (or a run folder) to continue from.
    resume: str | None = None
    #: Settings of the experiment a resumed run may change from its checkpoint's
    #: (e.g. ``[optim.lr]`` after a diverged step): keys, or whole sections. Any
    #: other difference is refused as another experiment. The change is recorded
    #: in ``metrics.jsonl`` at the step the run resumed from.
    resume_with_changes: list[str] = field(default_factory=list)
    #: Also checkpoint every this many steps (the end of an epoch always is).
    checkpoint_every_steps: int | None = None
    #: Also measure validation accuracy every this many steps (the end of an epoch
    #: always does), for ``target_val_acc`` and ``accuracy_vs_samples.png``.
    eval_every_steps: int | None = None
    #: tau: record the step, and the training samples learned from, at which
    #: validation accuracy first reaches this (L2T's measure of teaching speed).
    target_val_acc: float | None = None
    #: End the run once ``target_val_acc`` is reached (an L2T episode).
    stop_at_target: bool = False
    #: Students taught one after another by the same teacher, each from a fresh
    #: start with a seed of its own; a policy-gradient teacher (L2T) learns at the
    #: end of each. Every episode runs ``epochs`` (or stops at its target).
    episodes: int = 1
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

    #: ``unrolled``, ``reversible``, ``lookahead``, ``finite_difference``, ``implicit`` or
    #: ``learned_optimizer``.
    method: str | None = None
    #: K: student steps per teacher step.
    inner_steps: int | None = None
    #: B <= K: student steps the hypergradient looks back through.
    backprop_steps: int | None = None
    #: Let gradients flow through the lesson's dependence on the student (dw/dtheta kept).
    keep_weight_grad: bool | None = None
    #: Clean validation samples per teacher step: a batch of this many, drawn in turn,
    #: or ``all``, the whole validation split (the papers' M(D_valid)), in chunks of
    #: ``train.eval_batch_size``.
    val_batch_size: int | str = 100
    #: The method's own settings, e.g. ``{solver: neumann, iterations: 20}`` for ``implicit``.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyConfig:
    """How a policy-gradient teacher (l2t) learns by REINFORCE; unset values keep its declaration."""

    #: The moving-average reward baseline's decay, in [0, 1).
    baseline_decay: float | None = None
    #: ``actions``: score every sampled decision (L2T's estimator); ``parameters``: explore
    #: in the policy's parameters, one draw per episode (PGPE).
    exploration: str | None = None
    #: With ``parameters``: the standard deviation of the parameters' noise.
    noise_std: float | None = None
    #: With ``parameters``: episodes in pairs, with +eps and -eps.
    mirrored: bool | None = None


@dataclass
class TeacherConfig:
    """Who guides the student. ``none`` trains the student alone."""

    name: str = "none"
    #: Extra constructor arguments of the chosen teacher (a file or override that
    #: names another teacher starts them afresh).
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Let a learning teacher learn; false keeps it as it is (e.g. loaded from ``checkpoint``).
    learn: bool = True
    #: A metateach checkpoint whose teacher weights to load.
    checkpoint: str | None = None
    #: A filtering teacher's batches are refilled with the samples it keeps from
    #: further training batches until they are full (L2T); for teachers that learn
    #: by policy gradient or not at all.
    refill: bool = False
    #: How the student's average training loss, which a teacher may read, is taken:
    #: ``mean`` since the first step (the deep-interaction paper's M1) or ``ema``
    #: (exponential, 0.9); unset keeps the teacher's declaration.
    loss_average: str | None = None
    optim: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)
    hypergrad: HypergradConfig = field(default_factory=HypergradConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


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
    #: W&B's job type (a comparison sets it to the variant).
    job_type: str | None = None
    #: What the paper reports for this run's setting (%), which a comparison that gives it
    #: sets, so that it lies beside the run's own numbers in W&B.
    paper: float | None = None
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
    #: With diagnostics and W&B: the epochs whose diagnostic sample is logged as a W&B table
    #: (index, labels, loss, margin, weight, kept), counted from 1, or from the end when
    #: negative (-1: the last); [] logs none.
    table_epochs: list[int] = field(default_factory=lambda: [-1])
    #: Give the table a thumbnail of each image (image data; off for a lighter table).
    table_images: bool = True
    #: Send every checkpoint to W&B as a version of the run's ``model`` artifact (aliased
    #: ``last`` or ``best``), with the config and the metrics at save time as metadata.
    checkpoint_artifacts: bool = False


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
    #: or files (``teachers/mine.py``) whose ``@TEACHERS.register`` etc. add entries. A
    #: file named in a YAML file is found beside it; on the command line, from the working
    #: directory. Every process that trains imports them (a comparison's workers too).
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


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dicts, ready for YAML, JSON, W&B or a checkpoint."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration as one level of dotted keys, as overrides name them
    (``teacher.kwargs.hidden``): what W&B's run table and sweeps read, and what
    checkpoints are compared by."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The content of a YAML file that a user wrote, or a :class:`ConfigError` in one line.

    ``what`` names the kind of file in the messages. A file that is not UTF-8
    text, is not valid YAML (the message points at line and column), repeats
    a key in one mapping, or is empty is refused.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} {path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} on line {line}"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or first_line(e)}") from None
    try:
        content = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None)
        raise ConfigError(
            f"{what} {path} is not valid YAML{where}" + (f": {problem}" if problem else "")
        ) from None
    if content is None:
        raise ConfigError(f"{what} {path} is empty: it holds no settings")
    return content


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it would take the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the safe loader's own error says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (first on line {first})",
                    key_node.start_mark,
                )  # fmt: skip
        return super().construct_mapping(node, deep)


def check_overrides(overrides: Sequence[str], origin: str = "overrides") -> None:
    """Raise :class:`ConfigError` if one list of ``key=value`` overrides gives a key two values.

    For the lists a user writes (a command line, a comparison's lists);
    :func:`load_config` takes layered lists, where a later one wins.
    """
    given: dict[str, str] = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if given.get(key.strip(), value) != value:
            raise ConfigError(
                f"{origin}: {key.strip()} is given two values ({given[key.strip()]}, then "
                f"{value}); give it once"
            )
        given[key.strip()] = value


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """The file's content on top of its ``base:`` files, recursively."""
    if not path.is_file():
        where = f" (base of {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"config file {path} builds on itself through 'base:'")
    content = read_yaml(path)
    if not isinstance(content, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(content).__name__}"
        )
    plugins = content.get("plugins")
    if isinstance(plugins, list):  # a plugin file is found where the config that names it is
        content["plugins"] = [
            str(path.parent / p) if isinstance(p, str) and p.endswith(".py") else p for p in plugins
        ]
    bases = content.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"config file {path}: base must be a file name or a list of file names, got {bases!r}"
        )
    merged = OmegaConf.create()
    for base in bases:
        base_cfg = _read_with_bases(path.parent / base, (*chain, resolved))
        merged = _layer(merged, base_cfg)
    return _layer(merged, OmegaConf.create(content))


#: Sections whose ``kwargs`` are arguments of the thing their ``name`` names.
_NAMED_SECTIONS = ("model", "teacher", "optim", "teacher.optim")


#: The defaults of the sections whose settings adjust a teacher's declaration of how it learns
#: (:data:`metateach.validation.SECTIONS`): a layer that names another teacher drops the old
#: one's (the validation batch size is the data's, and stays).
_LEARNING_DEFAULTS = {"hypergrad": HypergradConfig(), "policy": PolicyConfig()}


def _layer(below: DictConfig, above: DictConfig) -> DictConfig:
    """``above`` merged over ``below``; where ``above`` names another model or teacher, the
    ``kwargs`` meant for the old one are dropped, and for a teacher its hypergradient
    and policy settings too (``above``'s own apply).

    So ``teacher.name=none`` on a co-teaching config trains the baseline, instead of
    handing ``gradual_epochs`` to a teacher that has no such option, and
    ``teacher.name=meta_weight_net`` on a deep-interaction config learns as
    Meta-Weight-Net does, not through the other teacher's K = 20 unrolled steps.
    """
    for section in _NAMED_SECTIONS:
        name = OmegaConf.select(above, f"{section}.name")
        if name is None or name == OmegaConf.select(below, f"{section}.name"):
            continue
        below = copy.deepcopy(below)
        if OmegaConf.select(below, f"{section}.kwargs"):
            OmegaConf.update(below, f"{section}.kwargs", {}, merge=False)
        for part, (keys, _, _) in SECTIONS.items():
            settings = OmegaConf.select(below, f"{section}.{part}")
            for key in keys if settings is not None else ():
                if key in settings:
                    settings[key] = getattr(_LEARNING_DEFAULTS[part], key)
        if OmegaConf.select(below, f"{section}.loss_average") is not None:
            below[section].loss_average = None  # the old teacher's declaration, like its method
    return OmegaConf.merge(below, above)


def _merge(schema: DictConfig, update: DictConfig, origin: str) -> DictConfig:
    """Merge ``update`` into the typed ``schema``, turning OmegaConf's errors into one line."""
    if misplaced := _value_for_section(schema, update):
        key, value = misplaced
        raise ConfigError(
            f"{origin}: {key} must be a mapping of its settings, not {value!r}; "
            f"valid keys in {key!r}: {', '.join(schema_keys(key))}"
        )
    try:
        return _layer(schema, update)
    except ConfigKeyError as e:
        raise ConfigError(_unknown_key_message(e, origin)) from None
    except ValidationError as e:
        raise ConfigError(
            f"{origin}: wrong type for {e.full_key or '?'}: {first_line(e.msg)}"
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: {first_line(e.msg or e)}") from None


def _value_for_section(schema: DictConfig, update: Any, prefix: str = "") -> tuple[str, Any] | None:
    """The first key where ``update`` gives a plain value for one of ``schema``'s sections."""
    if not isinstance(update, DictConfig):
        return None
    for key, value in update.items_ex(resolve=False):
        below = schema.get(key) if key in schema else None
        if isinstance(below, DictConfig) and OmegaConf.get_type(below) is not dict:
            if not isinstance(value, DictConfig):
                return f"{prefix}{key}", value
            if found := _value_for_section(below, value, f"{prefix}{key}."):
                return found
    return None


def schema_keys(section: str) -> list[str]:
    """The keys of a section of :class:`ExperimentConfig` (``"train"``, ``"teacher.hypergrad"``)."""
    node: Any = ExperimentConfig()
    for part in section.split(".") if section else []:
        node = getattr(node, part, None)
    return list(vars(node)) if hasattr(node, "__dataclass_fields__") else []


def _unknown_key_message(e: ConfigKeyError, origin: str) -> str:
    key = str(e.full_key)
    parent, _, _ = key.rpartition(".")
    valid = ", ".join(schema_keys(parent))
    where = f"'{parent}'" if parent else "the top level"
    return f"{origin}: unknown key {key!r}; valid keys in {where}: {valid}"
