"""A comparison's results: the runs' summaries tabulated (mean and standard deviation over
seeds, with the paper's numbers), written as ``results.md`` and ``results.json``, and drawn:
``results.png``, ``results_course.png``, ``results_speed.png``, ``figure2.png``.

:func:`write_results` does all of it for a finished :func:`~metateach.lab.compare.run_comparison`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import yaml
from matplotlib.ticker import MaxNLocator

from metateach.config import LoggingConfig, load_config
from metateach.logging import log_comparison, read_metrics
from metateach.report.diagnostics import SNAPSHOT, WeightSnapshot
from metateach.report.plots import plot_figure2, save_figure

if TYPE_CHECKING:
    from metateach.lab.compare import Comparison, PairedTable

__all__ = [
    "summarize",
    "selected",
    "markdown_table",
    "paired_table",
    "write_results",
    "accuracy_curve",
    "course",
]

#: What each run reports, and the table's column for it.
METRICS = {"test/acc": "test accuracy (%)", "test/acc_at_best_val": "test accuracy at best val (%)"}
#: What ``results_course.png`` draws epoch by epoch, where the runs logged it, as
#: metric -> (axis label, factor to draw it in, y scale): the student's test
#: accuracy, the teacher's share of weight on mislabeled samples (its diagnostic
#: sample) and the norm of its hypergradient.
COURSE = {
    "test/acc": ("test accuracy (%)", 100.0, "linear"),
    "teacher/noisy_weight_share": ("teacher's weight on mislabeled samples (%)", 100.0, "linear"),
    "teacher/effective_sample_share": (
        "samples the weight effectively falls on (%)",
        100.0,
        "linear",
    ),
    "teacher/hypergrad_norm": ("hypergradient norm (epoch mean)", 1.0, "log"),
    "train/lr_scale": ("a teacher's factor on the learning rate (epoch mean)", 1.0, "log"),
}
#: Teaching speed, for runs with ``train.target_val_acc``: what reaching it took.
SPEED = {
    "target/step": "steps to the target",
    "target/samples_learned": "samples to the target",
    "target/samples_examined": "samples examined to the target",
}


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
    if results and (saved := Path(results[0]["folder"]) / "config.yaml").is_file():
        logging = LoggingConfig(**yaml.safe_load(saved.read_text())["logging"])
        log_comparison(comparison.name, rows, comparison.paper, logging, folder)
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
    return [
        (record["trainer/samples_learned"], record["eval/val_acc"])
        for record in read_metrics(folder)
        if "eval/val_acc" in record
    ]


def course(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each :data:`COURSE` metric a run logged, as (epoch, value) at the end of every epoch
    (a metric recorded every step, the hypergradient's norm, as its epoch's mean)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(folder):
        if "trainer/epoch" in record:
            for key in (k for k in COURSE if k in record):
                series.setdefault(key, []).append((int(record["trainer/epoch"]), record[key]))
    return series


def _last_epoch(folder: str | Path, keys: Sequence[str]) -> dict[str, float]:
    """The values of ``keys`` in the last epoch record of a run that logged them."""
    values: dict[str, float] = {}
    for record in read_metrics(folder):
        if "trainer/epoch" in record:
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
                best = max(runs, key=lambda r: r["val/best_acc"])
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


def plot_comparison(rows: Sequence[Mapping[str, float]], title: str, path: str | Path) -> Path:
    """Test accuracy per variant, mean with the seeds' standard deviation as error bars."""
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 4), constrained_layout=True)
    names = [str(r["variant"]) for r in rows]
    means = [r["test/acc"] for r in rows]
    stds = [r["test/acc std"] for r in rows]
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    low = min(m - s for m, s in zip(means, stds, strict=True))
    ax.set_ylim(
        max(0.0, low - 5), min(100.0, max(m + s for m, s in zip(means, stds, strict=True)) + 2)
    )
    ax.set(ylabel="test accuracy (%)", title=title)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_course(
    courses: Mapping[str, Sequence[Mapping[str, Sequence[tuple[int, float]]]]],
    panels: Mapping[str, tuple[str, float, str]],
    noise_rate: float | None,
    title: str,
    path: str | Path,
) -> Path:
    """Each variant's course through training, one panel per metric, the mean over its seeds.

    ``courses``: variant -> one mapping per seed, metric -> (epoch, value)
    (:func:`course`); ``panels``: metric -> (axis label,
    factor to draw it in, y scale), in order (:data:`COURSE`).
    A panel is drawn for each metric some run logged; a variant without the
    metric (no teacher) is absent from it.
    ``noise_rate`` marks the share of mislabeled samples, the weight they
    get without a teacher; without any (None or 0) their panel is left out.
    """
    drawn = [
        key
        for key in panels
        if any(key in c for runs in courses.values() for c in runs)
        and (key != "teacher/noisy_weight_share" or noise_rate)  # no mislabeled samples to weigh
    ]
    fig, axes = plt.subplots(
        1, len(drawn), figsize=(5.2 * len(drawn), 4.2), constrained_layout=True, squeeze=False
    )
    colors = plt.get_cmap("tab10" if len(courses) <= 10 else "tab20")
    for ax, key in zip(axes[0], drawn, strict=True):
        label, scale, yscale = panels[key]
        for n, (variant, runs) in enumerate(courses.items()):
            by_epoch: dict[int, list[float]] = {}
            for run in runs:
                for epoch, value in run.get(key, ()):
                    by_epoch.setdefault(epoch, []).append(value)
            if by_epoch:
                epochs = sorted(by_epoch)
                means = [scale * float(np.mean(by_epoch[e])) for e in epochs]
                ax.plot(epochs, means, color=colors(n), label=f"{variant} ({len(runs)})")
        if key == "teacher/noisy_weight_share" and noise_rate is not None:
            ax.axhline(100 * noise_rate, color="gray", linestyle="--", label="mislabeled share")
        ax.set(xlabel="epoch", ylabel=label, yscale=yscale)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    fig.legend(
        handles.values(), handles.keys(), loc="outside right upper", fontsize=8,
        title="variant (seeds)", title_fontsize=8,
    )  # fmt: skip
    fig.suptitle(f"{title}: the course of training, mean over seeds")
    return save_figure(fig, path)


def plot_speed_comparison(
    curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]],
    target: float | None,
    title: str,
    path: str | Path,
) -> Path:
    """Validation accuracy against training samples learned from, one colour per variant, a line per seed."""
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for i, (variant, runs) in enumerate(curves.items()):
        for j, points in enumerate(runs):
            if points:
                samples, accuracy = zip(*points, strict=True)
                ax.plot(samples, [100 * a for a in accuracy], color=f"C{i % 10}", alpha=0.8,
                        linewidth=1.2, label=variant if j == 0 else None)  # fmt: skip
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", label=f"target {100 * target:g}%")
    ax.set(xlabel="training samples learned from", ylabel="validation accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
