"""Compare teachers (or any settings) over several seeds, and tabulate the result.

A comparison file names a base experiment, the seeds, and the variants to
run on it, each a list of ``key=value`` overrides::

    config: ../cpu/mnist_noisy40.yaml
    seeds: [0, 1, 2]
    variants:
      none: [teacher.name=none]
      meta_weight_net: [teacher.name=meta_weight_net]
    paper:                      # optional: published numbers (%) to print beside ours
      meta_weight_net: 92.9

A variant may also name an experiment of its own, for comparisons across a
paper's settings (the top-level ``config`` is then optional)::

    variants:
      sym20: {config: ../../srit/cifar10_sym20.yaml}
      sym40: {config: ../../srit/cifar10_sym40.yaml, overrides: [train.epochs=10]}

Two methods compared setting by setting can be tabulated side by side, one
row per setting, with their difference; variants are then named
``<prefix><setting>``::

    table:
      pair: {co-teaching: co_teaching_, SRIT: srit_}   # column title: variant prefix
      row_title: noise                                  # optional, default "setting"
      rows: {sym20: symmetric 20%, pair40: pair-flip 40%}   # optional: order and labels
      last_epoch: {label precision (%): peer/label_precision_student}  # optional

``last_epoch`` adds, for both methods, the mean over seeds of a metric of
each run's last epoch (a fraction, shown in %).

The deep-interaction paper's Figure 2 (weight against loss, and the
internal states' t-SNE by class and by weight) for some of the variants,
one row each, from their first seed's run, goes to ``figure2.png``::

    figure2: {T0 (surface features M1): surface, T1 (internal states I0 + M0): internal}

A setting chosen on validation, as papers choose a baseline's hyperparameter,
is a row of its own: per seed, the variant of the group with the best
validation accuracy (``val/best_acc``), and its numbers::

    select:
      focal: [focal_g05, focal_g1, focal_g2]   # the paper may give a number for "focal"

:func:`run_comparison` trains every (variant, seed) pair in a folder of its
own, skips pairs already finished and resumes pairs that were cut short, so
an interrupted comparison loses nothing. :mod:`metateach.lab.results` turns the runs'
summaries into mean and standard deviation per variant.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metateach.config import check_overrides, config_to_dict, load_config, read_yaml
from metateach.errors import ConfigError, check_folder_name, check_keys
from metateach.logging import read_summary
from metateach.rundir import check_same_experiment, unfinished

__all__ = [
    "Comparison",
    "load_comparison",
    "run_comparison",
]


@dataclass
class Comparison:
    """A base config, seeds, and named variants of overrides (and, for some, configs of their own)."""

    config: Path | None
    seeds: list[int]
    variants: dict[str, list[str]]
    name: str = "comparison"
    overrides: list[str] = field(default_factory=list)
    #: Published test accuracies (%) by variant, for the table.
    paper: dict[str, float] = field(default_factory=dict)
    #: Variants that run an experiment of their own instead of ``config``.
    configs: dict[str, Path] = field(default_factory=dict)
    #: Two methods side by side, one row per setting (the module docstring's ``table``).
    pairs: PairedTable | None = None
    #: Row title -> variant, for the deep-interaction paper's Figure 2 (``figure2.png``).
    figure2: dict[str, str] = field(default_factory=dict)
    #: Row name -> variants, one chosen per seed on validation accuracy.
    select: dict[str, list[str]] = field(default_factory=dict)

    def config_of(self, variant: str) -> Path:
        """The experiment ``variant`` runs."""
        config = self.configs.get(variant, self.config)
        assert config is not None, f"variant {variant!r} has no config"  # load_comparison checks
        return config


@dataclass(frozen=True)
class PairedTable:
    """Two methods side by side: variants ``<prefix><setting>``, one row per setting."""

    columns: dict[str, str]  # column title -> variant prefix; two of them
    rows: dict[str, str]  # setting -> its label, in the table's order
    row_title: str = "setting"
    last_epoch: dict[str, str] = field(default_factory=dict)  # column title -> metric key


def load_comparison(path: str | Path) -> Comparison:
    """Read a comparison file (see the module docstring); errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file not found: {path}")
    content = read_yaml(path, "comparison file")
    check_keys(
        content,
        {"config", "seeds", "variants", "overrides", "paper", "table", "figure2", "select"},
        f"comparison file {path}",
    )
    if "variants" not in content:
        raise ConfigError(f"comparison file {path}: missing key 'variants'")
    variants, configs = _variants(content["variants"], path)
    lacking = [v for v in variants if v not in configs]
    if "config" not in content and (lacking or not variants):
        because = f" (variant {lacking[0]!r} names none of its own)" if lacking else ""
        raise ConfigError(f"comparison file {path}: missing key 'config'{because}")
    seeds = content.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise ConfigError(
            f"comparison file {path}: seeds must be a non-empty list of integers, got {seeds!r}"
        )
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"comparison file {path}: seeds {seeds} repeat a seed")
    overrides = content.get("overrides", [])
    if not isinstance(overrides, list):
        raise ConfigError(f"comparison file {path}: overrides must be a list of key=value")
    check_overrides([str(o) for o in overrides], f"comparison file {path}: overrides")
    select = content.get("select", {})
    if not isinstance(select, dict) or not all(
        isinstance(group, list)
        and group
        and all(v in variants for v in group)
        and name not in variants
        for name, group in select.items()
    ):
        raise ConfigError(
            f"comparison file {path}: select must map new row names to lists of variants "
            f"(variants: {', '.join(variants)})"
        )
    paper = content.get("paper", {})
    if not isinstance(paper, dict) or not all(
        (k in variants or k in select) and isinstance(v, int | float) for k, v in paper.items()
    ):
        raise ConfigError(
            f"comparison file {path}: paper must map variant (or select) names to numbers "
            f"(variants: {', '.join(variants)})"
        )
    figure2 = content.get("figure2", {})
    if not isinstance(figure2, dict) or not all(v in variants for v in figure2.values()):
        raise ConfigError(
            f"comparison file {path}: figure2 must map row titles to variant names "
            f"(variants: {', '.join(variants)})"
        )
    return Comparison(
        config=path.parent / content["config"] if "config" in content else None,
        seeds=seeds,
        variants=variants,
        name=path.stem,
        overrides=[str(o) for o in overrides],
        paper={str(k): float(v) for k, v in paper.items()},
        configs=configs,
        pairs=_paired_table(content["table"], variants, path) if "table" in content else None,
        figure2={str(k): str(v) for k, v in figure2.items()},
        select={str(k): [str(v) for v in group] for k, group in select.items()},
    )


def _paired_table(content: Any, variants: Sequence[str], path: Path) -> PairedTable:
    """The ``table`` of a comparison file, checked against its variants."""
    where = f"comparison file {path}: table"
    check_keys(content, {"pair", "rows", "row_title", "last_epoch"}, where)
    pair, rows, last_epoch = (content.get(k, {}) for k in ("pair", "rows", "last_epoch"))
    if not isinstance(pair, dict) or len(pair) != 2:
        raise ConfigError(f"{where}: pair must map two column titles to variant prefixes")
    if not isinstance(rows, dict) or not isinstance(last_epoch, dict):
        raise ConfigError(f"{where}: rows and last_epoch must be mappings")
    prefixes = [str(p) for p in pair.values()]
    settings = {v[len(p) :]: None for v in variants for p in prefixes if v.startswith(p) and v != p}
    if not settings:
        raise ConfigError(
            f"{where}: no variant is named <prefix><setting> for the prefixes {', '.join(prefixes)}"
        )
    if unknown := [r for r in rows if r not in settings]:
        raise ConfigError(
            f"{where}: rows: no variant for setting {unknown[0]!r} (settings: {', '.join(settings)})"
        )
    return PairedTable(
        columns={str(k): str(v) for k, v in pair.items()},
        rows={str(k): str(v) for k, v in rows.items()} or {s: s for s in settings},
        row_title=str(content.get("row_title", "setting")),
        last_epoch={str(k): str(v) for k, v in last_epoch.items()},
    )


def _variants(content: Any, path: Path) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """The ``variants`` of a comparison file: name -> overrides, and name -> config where given."""
    usage = (
        f"comparison file {path}: variants must map names to lists of key=value overrides "
        "or to {config: FILE, overrides: [...]}"
    )
    if not isinstance(content, dict):
        raise ConfigError(usage)
    variants, configs = {}, {}
    for name, value in content.items():
        check_folder_name(str(name), f"comparison file {path}: variant")
        if isinstance(value, dict):
            check_keys(value, {"config", "overrides"}, f"comparison file {path}: variant {name!r}")
            if "config" not in value:
                raise ConfigError(f"comparison file {path}: variant {name!r}: missing key 'config'")
            configs[str(name)] = path.parent / str(value["config"])
            value = value.get("overrides", [])
        if not isinstance(value, list):
            raise ConfigError(usage)
        variants[str(name)] = [str(o) for o in value]
        check_overrides(variants[str(name)], f"comparison file {path}: variant {name!r}")
    return variants, configs


def _ignore_ctrl_c() -> None:
    """A comparison's worker leaves SIGINT to its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_comparison(
    comparison: Comparison,
    out_dir: Path,
    overrides: Sequence[str] = (),
    train: Callable[..., dict[str, Any]] | None = None,
    jobs: int = 1,
    tags: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Train every (variant, seed) pair under ``out_dir``; return each run's summary with its names.

    In W&B the runs of a comparison are one group, named after it (unless
    ``logging.group`` is set), each of the variant's job type, tagged with its
    seed and ``tags`` (a suite adds its name), with the paper's number for the
    variant, where the comparison gives one, in its config.

    ``train(cfg)`` runs one experiment (:func:`metateach.train` by default,
    which a signal stops at its next step boundary, saved); finished runs
    are read back, interrupted ones resumed. With ``jobs`` > 1 that
    many runs train at once, each in a process of its own with an equal
    share of the CPU threads (unless ``train.threads`` is set); ``train``
    must then be picklable.
    """
    if train is None:
        from metateach import train as train_experiment

        train = train_experiment
    runs, pending = [], []
    for variant, variant_overrides in comparison.variants.items():
        for seed in comparison.seeds:
            run_name = f"{variant}-seed{seed}"
            folder = out_dir / run_name
            cfg = load_config(
                comparison.config_of(variant),
                [*comparison.overrides, *variant_overrides, f"train.seed={seed}", f"train.out_dir={out_dir}",
                 f"train.run_name={run_name}", "train.progress=false", *overrides],
            )  # fmt: skip
            cfg.logging.group = cfg.logging.group or comparison.name
            cfg.logging.job_type = cfg.logging.job_type or variant
            cfg.logging.paper = comparison.paper.get(variant, cfg.logging.paper)
            cfg.logging.tags = list(dict.fromkeys([*cfg.logging.tags, f"seed{seed}", *tags]))
            saved = folder / "config.yaml"
            if saved.is_file():
                # A run of another experiment under this name must not be reused or resumed.
                check_same_experiment(yaml.safe_load(saved.read_text()), config_to_dict(cfg), saved)
            if unfinished(cfg, folder):
                pending.append(cfg)
            runs.append((variant, seed, folder))
    # Seed by seed: a comparison cut short has its first seeds of every variant.
    pending.sort(key=lambda cfg: comparison.seeds.index(cfg.train.seed))
    if jobs > 1 and len(pending) > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        for cfg in pending:
            cfg.train.threads = cfg.train.threads or threads
        # Spawned, not forked: a forked PyTorch may hang in its thread pools.
        # A fresh process per run; leaving the block for any reason, even an
        # interrupt, sends each worker one SIGTERM and waits for it, so none
        # trains on unwatched: the trainer's run saves at its next step
        # boundary and stops. Ctrl-C, which reaches the workers too, is their
        # parent's to answer, or that SIGTERM would be a second signal.
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs, _ignore_ctrl_c, maxtasksperchild=1) as pool:
            pool.map(train, pending, chunksize=1)
    else:
        for cfg in pending:
            train(cfg)
    return [
        {"variant": variant, "seed": seed, "folder": str(folder),
         **read_summary(folder)}
        for variant, seed, folder in runs
    ]  # fmt: skip
