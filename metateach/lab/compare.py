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
validation accuracy (``best/val_acc``), and its numbers::

    select:
      focal: [focal_g05, focal_g1, focal_g2]   # the paper may give a number for "focal"

:func:`run_comparison` trains every (variant, seed) pair in a folder of its
own, skips pairs already finished and resumes pairs that were cut short, so
an interrupted comparison loses nothing. :func:`summarize` turns the runs'
summaries into mean and standard deviation per variant.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metateach.config import config_to_dict, load_config
from metateach.errors import ConfigError, check_keys
from metateach.logging import read_metrics
from metateach.report.diagnostics import SNAPSHOT, WeightSnapshot
from metateach.rundir import check_same_experiment, unfinished

__all__ = [
    "Comparison",
    "load_comparison",
    "run_comparison",
    "summarize",
    "selected",
    "markdown_table",
    "paired_table",
    "write_results",
    "accuracy_curve",
    "course",
]

#: What each run reports, and the table's column for it.
METRICS = {"test/acc": "test accuracy (%)", "best/test_acc": "test accuracy at best val (%)"}
#: What ``results_course.png`` draws epoch by epoch, where the runs logged it, as
#: metric -> (axis label, factor to draw it in, y scale): the student's test
#: accuracy, the teacher's share of weight on mislabeled samples (its diagnostic
#: sample) and the norm of its hypergradient.
COURSE = {
    "test/acc": ("test accuracy (%)", 100.0, "linear"),
    "teacher/noisy_weight_share": ("teacher's weight on mislabeled samples (%)", 100.0, "linear"),
    "teacher/hypergrad_norm": ("hypergradient norm (epoch mean)", 1.0, "log"),
}
#: Teaching speed, for runs with ``train.target_val_acc``: what reaching it took.
SPEED = {
    "target/step": "steps to the target",
    "target/samples": "samples to the target",
    "target/examined_samples": "samples examined to the target",
}


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
    content = yaml.safe_load(path.read_text()) or {}
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
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"comparison file {path}: seeds must be a list of integers")
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
        overrides=[str(o) for o in content.get("overrides", [])],
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
        if isinstance(value, dict):
            check_keys(value, {"config", "overrides"}, f"comparison file {path}: variant {name!r}")
            if "config" not in value:
                raise ConfigError(f"comparison file {path}: variant {name!r}: missing key 'config'")
            configs[str(name)] = path.parent / str(value["config"])
            value = value.get("overrides", [])
        if not isinstance(value, list):
            raise ConfigError(usage)
        variants[str(name)] = [str(o) for o in value]
    return variants, configs


def run_comparison(
    comparison: Comparison,
    out_dir: Path,
    overrides: Sequence[str] = (),
    train: Callable[..., dict[str, Any]] | None = None,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Train every (variant, seed) pair under ``out_dir``; return each run's summary with its names.

    ``train(cfg)`` runs one experiment (the trainer's by default); finished
    runs are read back, interrupted ones resumed. With ``jobs`` > 1 that
    many runs train at once, each in a process of its own with an equal
    share of the CPU threads (unless ``train.threads`` is set); ``train``
    must then be picklable.
    """
    if train is None:
        from metateach.trainer import train as train_experiment

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
        # interrupt, terminates the workers, so none trains on unwatched.
        with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
            pool.map(train, pending, chunksize=1)
    else:
        for cfg in pending:
            train(cfg)
    return [
        {"variant": variant, "seed": seed, "folder": str(folder),
         **json.loads((folder / "summary.json").read_text())}
        for variant, seed, folder in runs
    ]  # fmt: skip


def write_results(
    comparison: Comparison,
    folder: Path,
    results: Sequence[dict[str, Any]],
    overrides: Sequence[str] = (),
) -> str:
    """Write ``results.json``, ``results.md`` and the plots of a comparison's runs; return the table.

    With a paired table (``Comparison.pairs``), that is the table returned;
    ``results.md`` has it above the table by variant.

    With teaching speed measured, also ``results_speed.png``: validation
    accuracy against training samples of every run, and the target; with
    ``figure2`` asked for, ``figure2.png``; where a teacher logged its
    course (:data:`COURSE`), ``results_course.png``: each variant's mean over
    seeds, epoch by epoch.
    """
    from metateach.report.plots import (
        plot_comparison,
        plot_course,
        plot_figure2,
        plot_speed_comparison,
    )

    pairs = comparison.pairs
    last_epoch = list(pairs.last_epoch.values()) if pairs else []
    if last_epoch:
        results = [{**r, **_last_epoch(r["folder"], last_epoch)} for r in results]
    chosen = selected(results, comparison.select)
    rows = summarize([*results, *chosen], last_epoch)
    table = markdown_table(rows, comparison.paper)
    document = table
    if pairs:  # the paired table first, and returned
        table = paired_table(rows, pairs, comparison.paper)
        document = f"{table}\n\nBy variant:\n\n{document}"
    (folder / "results.json").write_text(
        json.dumps({"runs": list(results), "summary": rows}, indent=2) + "\n"
    )
    if chosen:
        document += "\n\nChosen on validation accuracy, by seed: " + "; ".join(
            f"{r['variant']} seed {r['seed']}: {r['chosen']}" for r in chosen
        )
    (folder / "results.md").write_text(document + "\n")
    plot_comparison(rows, comparison.name, folder / "results.png")
    courses: dict[str, list[dict[str, list[tuple[int, float]]]]] = {}
    for result in results:
        courses.setdefault(result["variant"], []).append(course(result["folder"]))
    if any(len(c) > 1 for runs in courses.values() for c in runs):  # a teacher logged its course
        rates = [r["noise/realized_rate"] for r in results if "noise/realized_rate" in r]
        noise = statistics.fmean(rates) if rates else None
        plot_course(courses, COURSE, noise, comparison.name, folder / "results_course.png")
    if any("reached" in row for row in rows):  # teaching speed: the accuracy curves
        curves: dict[str, list] = {}
        for result in results:
            curves.setdefault(result["variant"], []).append(accuracy_curve(result["folder"]))
        first = next(iter(comparison.variants))
        common = [*comparison.overrides, *overrides]
        target = load_config(comparison.config_of(first), common).train.target_val_acc
        plot_speed_comparison(curves, target, comparison.name, folder / "results_speed.png")
    if comparison.figure2:
        first_run = {}
        for result in results:
            first_run.setdefault(result["variant"], Path(result["folder"]))
        snapshots = {
            title: WeightSnapshot.load(first_run[variant] / "diagnostics" / SNAPSHOT)
            for title, variant in comparison.figure2.items()
        }
        plot_figure2(snapshots, comparison.name, folder / "figure2.png")
    return table


def accuracy_curve(folder: str | Path) -> list[tuple[float, float]]:
    """(training samples learned from, validation accuracy) at each evaluation of a run."""
    points = []
    for record in read_metrics(folder):
        if "eval/val_acc" in record:
            points.append((record["eval/learned_samples"], record["eval/val_acc"]))
        elif "val/acc" in record and "train/learned_samples" in record:
            points.append((record["train/learned_samples"], record["val/acc"]))
    return points


def course(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each :data:`COURSE` metric a run logged, as (epoch, value) at the end of every epoch.

    A metric logged every few steps (the hypergradient's norm) is averaged
    over the records of its epoch; one logged per epoch is that epoch's value.
    """
    series: dict[str, list[tuple[int, float]]] = {}
    pending: dict[str, list[float]] = {}
    for record in read_metrics(folder):
        for key in COURSE:
            if key in record:
                pending.setdefault(key, []).append(record[key])
        if "epoch" in record:
            for key, values in pending.items():
                series.setdefault(key, []).append((int(record["epoch"]), statistics.fmean(values)))
            pending = {}
    return series


def _last_epoch(folder: str | Path, keys: Sequence[str]) -> dict[str, float]:
    """The values of ``keys`` in the last epoch record of a run that logged them."""
    values: dict[str, float] = {}
    for record in read_metrics(folder):
        if "epoch" in record:
            values.update({k: record[k] for k in keys if k in record})
    return values


def selected(
    results: Sequence[dict[str, Any]], select: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """For each ``select`` row and seed, the run of its group with the best validation accuracy,
    renamed to the row (with ``chosen``: the variant it was). Seeds missing a run of the
    group are left out, so every choice is among all its candidates."""
    chosen = []
    for name, group in select.items():
        for seed in dict.fromkeys(r["seed"] for r in results):
            runs = [r for r in results if r["seed"] == seed and r["variant"] in group]
            if len(runs) == len(group):
                best = max(runs, key=lambda r: r["best/val_acc"])
                chosen.append({**best, "variant": name, "chosen": best["variant"]})
    return chosen


def summarize(results: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per variant, in order of first appearance: runs, and mean and std of each of :data:`METRICS`.

    ``extra`` names more metrics (fractions, averaged in % like the others)
    over the runs that have them.

    Runs with a target accuracy (``train.target_val_acc``) add how many
    reached it and the mean and std, over those, of the steps and training
    samples it took (:data:`SPEED`).
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault(result["variant"], []).append(result)
    table = []
    for variant, runs in grouped.items():
        entry: dict[str, Any] = {"variant": variant, "runs": len(runs)}
        for metric in METRICS:
            entry.update(_mean_std(metric, [100 * r[metric] for r in runs]))
        for metric in extra:
            entry.update(_mean_std(metric, [100 * r[metric] for r in runs if metric in r]))
        if any(key in r for r in runs for key in SPEED):
            reached = [r for r in runs if r.get("target/step") is not None]
            entry["reached"] = len(reached)
            for key in SPEED:
                entry.update(_mean_std(key, [r[key] for r in reached if r.get(key) is not None]))
        table.append(entry)
    return table


def _mean_std(key: str, values: Sequence[float]) -> dict[str, float]:
    """``key`` and ``key std``: the mean and sample std of ``values`` (nan without any)."""
    return {
        key: statistics.fmean(values) if values else math.nan,
        f"{key} std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def markdown_table(rows: Sequence[dict[str, Any]], paper: dict[str, float] | None = None) -> str:
    """The summary as a Markdown table, mean +- std (sample std over seeds), and ``paper``'s numbers.

    With teaching speed measured, columns for the runs that reached the
    target and the steps and samples they took.
    """
    speed = any("reached" in row for row in rows)
    columns = (
        list(METRICS.values())
        + (["reached the target", *SPEED.values()] if speed else [])
        + (["paper (%)"] if paper else [])
    )
    lines = [
        "| variant | seeds | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [_mean_pm(row, m) for m in METRICS]
        if speed:
            cells.append(f"{row.get('reached', 0)}/{row['runs']}")
            cells += [_mean_pm(row, k, ",.0f") for k in SPEED]
        if paper:
            cells.append(f"{paper[row['variant']]:.2f}" if row["variant"] in paper else "–")
        lines.append(f"| {row['variant']} | {row['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(
    rows: Sequence[dict[str, Any]], pairs: PairedTable, paper: dict[str, float] | None = None
) -> str:
    """Two methods side by side, one row per setting: test accuracy, its difference, the paper's."""
    by_variant = {row["variant"]: row for row in rows}
    (title_a, prefix_a), (title_b, prefix_b) = pairs.columns.items()
    metric = next(iter(METRICS))
    columns = [
        pairs.row_title, title_a, title_b, f"{title_b} − {title_a}",
        *([f"paper: {title_a}", f"paper: {title_b}"] if paper else []),
        *(f"{title}, {title_a} / {title_b}" for title in pairs.last_epoch),
        "seeds",
    ]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for setting, label in pairs.rows.items():
        a, b = (by_variant.get(prefix + setting) for prefix in (prefix_a, prefix_b))
        cells = [label, _mean_pm(a, metric), _mean_pm(b, metric)]
        cells.append(f"{b[metric] - a[metric]:+.2f}" if a and b else "–")
        if paper:
            cells += [
                f"{paper[p + setting]:.2f}" if p + setting in paper else "–"
                for p in (prefix_a, prefix_b)
            ]
        for key in pairs.last_epoch.values():
            cells.append(" / ".join(_number(row, key, ".1f") for row in (a, b)))
        cells.append(str(min(row["runs"] for row in (a, b) if row) if a or b else 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_pm(row: dict[str, Any] | None, key: str, spec: str = ".2f") -> str:
    """``mean ± std`` of ``key`` in a summary row, or – without it."""
    mean = _number(row, key, spec)
    return mean if row is None or mean == "–" else f"{mean} ± {format(row[f'{key} std'], spec)}"


def _number(row: dict[str, Any] | None, key: str, spec: str) -> str:
    """``key`` of a summary row formatted by ``spec``, or – without it."""
    if row is None or math.isnan(row.get(key, math.nan)):
        return "–"
    return format(row[key], spec)
