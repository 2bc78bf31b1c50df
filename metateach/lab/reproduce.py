"""Reproduction suites: named lists of comparisons, run over their seeds and tabulated in one go.

A suite file (``configs/suites/<name>.yaml``) names the comparisons whose
tables make up a set of results, and the runs they need first::

    train:                      # optional: experiments the comparisons build on
      - {config: ../cpu/l2t_mnist_teacher.yaml, data: .}
    comparisons:
      quickstart: {file: ../compare/quickstart.yaml}
      cifar2000:
        file: ../compare/cifar10_jpeg_noisy40.yaml
        data: cifar10-jpeg      # data.root = <the data folder>/cifar10-jpeg
        overrides: [data.train_subset=2000]

``data`` is a folder under the data folder given on the command line (or
``$METATEACH_DATA``); without either, ``data.root`` is left to the configs.
Each comparison runs in ``<out>/<its name>/`` through
:func:`metateach.lab.compare.run_comparison`, so finished runs are read back and
cut ones resumed: a suite run again after its runs are done only tabulates.

:func:`run_suite` returns the tables; :func:`suite_markdown` puts them in
one document, with the command that made them; :func:`fill_blocks` writes
them into Markdown files (the README, the docs' results page) between
``<!-- results: NAME -->`` and ``<!-- /results -->``, so that their results
are generated, not typed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metateach.config import check_overrides, load_config, read_yaml
from metateach.errors import ConfigError, check_keys
from metateach.lab.compare import load_comparison, run_comparison
from metateach.lab.results import write_results
from metateach.report.diagnostics import SAMPLES
from metateach.rundir import unfinished

__all__ = [
    "Suite",
    "SuiteEntry",
    "load_suite",
    "run_suite",
    "suite_listing",
    "suite_markdown",
    "fill_blocks",
]


@dataclass(frozen=True)
class SuiteEntry:
    """One comparison (or, under ``train``, one experiment) of a suite."""

    file: Path
    data: str | None = None  # a folder under the data folder, for data.root
    overrides: list[str] = field(default_factory=list)


@dataclass
class Suite:
    name: str
    comparisons: dict[str, SuiteEntry]
    train: list[SuiteEntry] = field(default_factory=list)


def load_suite(name_or_path: str | Path, suites_dir: Path = Path("configs/suites")) -> Suite:
    """A suite by file path, or by name in ``suites_dir``; errors name the file and the key."""
    path = Path(name_or_path)
    if not path.is_file():
        path = suites_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in suites_dir.glob("*.yaml"))
        raise ConfigError(
            f"no suite {str(name_or_path)!r}: neither a file nor a name in {suites_dir} "
            f"(available: {', '.join(known) or 'none'})"
        )
    content = read_yaml(path, "suite")
    check_keys(content, {"comparisons", "train"}, f"suite {path}")
    comparisons = content.get("comparisons")
    if not isinstance(comparisons, dict) or not comparisons:
        raise ConfigError(f"suite {path}: comparisons must map names to {{file: ..., data: ...}}")
    train = content.get("train", [])
    if not isinstance(train, list):
        raise ConfigError(f"suite {path}: train must be a list of {{config: ..., data: ...}}")
    return Suite(
        name=path.stem,
        comparisons={
            str(k): _entry(v, "file", path, f"comparison {k!r}") for k, v in comparisons.items()
        },
        train=[_entry(v, "config", path, f"train[{i}]") for i, v in enumerate(train)],
    )


def _entry(value: Any, file_key: str, path: Path, where: str) -> SuiteEntry:
    if not isinstance(value, dict) or file_key not in value:
        raise ConfigError(f"suite {path}: {where} needs {{{file_key}: FILE}}")
    check_keys(value, {file_key, "data", "overrides"}, f"suite {path}: {where}")
    overrides = value.get("overrides", [])
    if not isinstance(overrides, list):
        raise ConfigError(f"suite {path}: {where}: overrides must be a list of key=value")
    check_overrides([str(o) for o in overrides], f"suite {path}: {where}: overrides")
    data = value.get("data")
    return SuiteEntry(
        Path(os.path.normpath(path.parent / str(value[file_key]))),
        None if data is None else str(data),
        [str(o) for o in overrides],
    )


def _data_overrides(entry: SuiteEntry, data_dir: Path | None) -> list[str]:
    """``data.root`` for ``entry`` under the data folder (none without one), then its own overrides."""
    base = data_dir or (
        Path(os.environ["METATEACH_DATA"]) if os.environ.get("METATEACH_DATA") else None
    )
    root = [] if entry.data is None or base is None else [f"data.root={base / entry.data}"]
    return [*root, *entry.overrides]


#: What the records of a suite keep of each finished run: enough for its tables, and for a
#: comparison to count the run finished.
RUN_RECORD = ("config.yaml", "summary.json", "metrics.jsonl")
#: Of a run the suite trains first, also the sample record the comparisons read.
TRAIN_RECORD = (*RUN_RECORD, f"diagnostics/{SAMPLES}")


def restore_records(records: Path, folder: Path, files: Sequence[str] = RUN_RECORD) -> bool:
    """Put a finished run's records (``records``) in its run folder (``folder``) if that is
    empty, so that it counts as finished; whether it did."""
    return not folder.exists() and _copy_finished(records, folder, files)


def save_records(folder: Path, records: Path, files: Sequence[str] = RUN_RECORD) -> None:
    """Copy a finished run's ``files`` from its run folder to ``records`` (nothing if unfinished)."""
    _copy_finished(folder, records, files)


def _copy_finished(source: Path, target: Path, files: Sequence[str]) -> bool:
    """Copy those of ``files`` that ``source`` has to ``target``, if ``source`` holds a finished
    run (its ``summary.json``); whether it did."""
    if not (source / "summary.json").is_file():
        return False
    for name in files:
        if (source / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
    return True


def run_suite(
    suite: Suite,
    out_dir: Path,
    data_dir: Path | None = None,
    jobs: int = 1,
    train: Callable[..., dict[str, Any]] | None = None,
    only: Sequence[str] | None = None,
    records: Path | None = None,
) -> dict[str, str]:
    """Run the suite's experiments, then its comparisons (all, or those named in ``only``).

    Returns comparison name -> Markdown table; each comparison's folder also
    gets its ``results.md``, ``results.json`` and plots.

    With ``records``, a folder of finished runs' records (:data:`RUN_RECORD`;
    ``<records>/<comparison>/<run>/``, and ``<records>/train/<run>/`` for the
    experiments trained first): runs found there are not trained again, and
    every run that finishes adds its own. Committed with a repository, the
    records carry a suite too long for one machine's session across several.
    """
    if only and (unknown := sorted(set(only) - set(suite.comparisons))):
        raise ConfigError(
            f"suite {suite.name} has no comparison {unknown[0]!r} "
            f"(it has: {', '.join(suite.comparisons)})"
        )
    if train is None:
        from metateach import train as train_experiment

        train = train_experiment
    for entry in suite.train:
        _train_once(entry, data_dir, train, None if records is None else records / "train")
    tables = {}
    for name, entry in suite.comparisons.items():
        if only and name not in only:
            continue
        comparison = load_comparison(entry.file)
        comparison.name = name
        overrides = _data_overrides(entry, data_dir)
        if records is not None and (records / name).is_dir():
            for run in sorted(p for p in (records / name).iterdir() if p.is_dir()):
                restore_records(run, out_dir / name / run.name)
        try:
            results = run_comparison(
                comparison, out_dir / name, overrides, train=train, jobs=jobs, tags=[suite.name]
            )
        finally:  # a suite cut short keeps the records of the runs it finished
            if records is not None and (out_dir / name).is_dir():
                for run in sorted(p for p in (out_dir / name).iterdir() if p.is_dir()):
                    save_records(run, records / name / run.name)
        tables[name] = write_results(comparison, out_dir / name, results, overrides)
    return tables


def _train_once(
    entry: SuiteEntry, data_dir: Path | None, train: Callable[..., Any], records: Path | None
) -> None:
    """Train ``entry``'s experiment in its own run folder, unless done (or in ``records``);
    resume it if it was cut."""
    cfg = load_config(entry.file, [*_data_overrides(entry, data_dir), "train.progress=false"])
    if not cfg.train.run_name:
        raise ConfigError(
            f"{entry.file}: a suite's train entry needs train.run_name, so that it is found again"
        )
    folder = Path(cfg.train.out_dir) / cfg.train.run_name
    kept = None if records is None else records / cfg.train.run_name
    if kept is not None:
        restore_records(kept, folder, TRAIN_RECORD)
    if unfinished(cfg, folder):
        train(cfg)
    if kept is not None:
        save_records(folder, kept, TRAIN_RECORD)


def suite_listing(
    suite: Suite, data_dir: Path | None = None, only: Sequence[str] | None = None
) -> str:
    """What the suite would run, without running it: each experiment it trains first, then
    each comparison's variants with their experiment, overrides and published number.

    Every variant's configuration is loaded (and checked) on the way, so a
    listing that comes back is a suite whose every cell loads.
    """
    lines = [f"suite {suite.name}"]
    for entry in suite.train:
        load_config(entry.file, _data_overrides(entry, data_dir))
        lines.append(f"  train first: {entry.file}")
    for name, entry in suite.comparisons.items():
        if only and name not in only:
            continue
        comparison = load_comparison(entry.file)
        common = f", every run: {' '.join(comparison.overrides)}" if comparison.overrides else ""
        lines.append(f"  {name} ({entry.file}, seeds {comparison.seeds}{common}):")
        for variant, overrides in comparison.variants.items():
            config = comparison.config_of(variant)
            every = [*_data_overrides(entry, data_dir), *comparison.overrides, *overrides]
            load_config(config, every)
            paper = comparison.paper.get(variant)
            lines.append(
                f"    {variant:<40} {os.path.normpath(config)}"
                + (f" [{' '.join(overrides)}]" if overrides else "")
                + (f"  paper {paper:.2f}" if paper is not None else "")
            )
        for row, group in comparison.select.items():
            paper = comparison.paper.get(row)
            lines.append(
                f"    {row:<40} the best on validation of {', '.join(group)}"
                + (f"  paper {paper:.2f}" if paper is not None else "")
            )
    return "\n".join(lines)


def suite_markdown(suite: Suite, tables: Mapping[str, str], command: str) -> str:
    """The suite's tables in one Markdown document, under the command that regenerates them."""
    parts = [f"# {suite.name}\n", f"Generated by `{command}`.\n"]
    for name, table in tables.items():
        parts.append(f"## {name}\n\n`{suite.comparisons[name].file}`\n\n{table}\n")
    return "\n".join(parts)


_BLOCK = re.compile(r"(<!-- results: ([\w.-]+) -->\n)(.*?)(<!-- /results -->)", re.DOTALL)


def fill_blocks(text: str, tables: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with each ``<!-- results: NAME -->`` block's content replaced by ``tables[NAME]``.

    Blocks of other names are left as they are. Returns the new text and
    the names filled.
    """
    filled = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in tables:
            return match.group(0)
        filled.append(name)
        return f"{match.group(1)}{tables[name]}\n{match.group(4)}"

    return _BLOCK.sub(replace, text), filled


def main(argv: Sequence[str] | None = None, prog: str = "reproduce.py") -> int:
    """``metateach reproduce SUITE [--data DIR] [--out runs] [--jobs N] [--records DIR]
    [--docs [PATH ...]]``."""
    import argparse
    import shlex
    import signal
    import sys

    from metateach.errors import MetateachError, RunInterrupted, first_line
    from metateach.lab.compare_cli import report_interrupted, sigterm_exits

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a suite's comparisons over their seeds and write their tables.",
    )
    parser.add_argument("suite", help="a name in configs/suites (e.g. cpu) or a suite file")
    parser.add_argument("--data", type=Path, help="the data folder (default: $METATEACH_DATA)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="where runs go (default: runs)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs to train at once (default: 1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these comparisons")
    parser.add_argument(
        "--records",
        type=Path,
        metavar="DIR",
        help="a folder of finished runs' records (config, summary, metrics): runs found there "
        "are not trained again, and each run that finishes adds its own (default: "
        "results/<suite> when that folder exists)",
    )
    parser.add_argument(
        "--docs",
        "--readme",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="fill the <!-- results: NAME --> blocks of these Markdown files, and of the .md "
        "files in these folders, with the tables (alone: README.md and docs/)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list every run the suite would make (loading each config), and run nothing",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    try:
        with sigterm_exits():
            suite = load_suite(args.suite)
            docs = args.docs if args.docs != [] else [Path("README.md"), Path("docs")]
            pages = markdown_pages(docs) if docs is not None else []
            if args.list:
                print(suite_listing(suite, args.data, args.only))
                return 0
            records = args.records
            if records is None and (Path("results") / suite.name).is_dir():
                records = Path("results") / suite.name
            tables = run_suite(
                suite, args.out, args.data, args.jobs, only=args.only, records=records
            )
    except MetateachError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # a run of this process stopped at a step boundary, saved
        return report_interrupted(e.signum)
    except KeyboardInterrupt:  # Ctrl-C to the command, its workers saved
        return report_interrupted(signal.SIGINT)
    invoked = ["python", "tools/reproduce.py"] if prog == "reproduce.py" else prog.split()
    command = shlex.join([*invoked, *(argv if argv is not None else sys.argv[1:])])
    document = args.out / f"{suite.name}.md"
    document.write_text(suite_markdown(suite, tables, command))
    print(document.read_text())
    print(f"results: {document}")
    placed = set()
    for page in pages:
        text, filled = fill_blocks(page.read_text(), tables)
        if filled:
            page.write_text(text)
            placed.update(filled)
            print(f"{page}: filled {', '.join(filled)}")
    if pages and (unplaced := [name for name in tables if name not in placed]):
        print(
            f"no <!-- results: NAME --> block for {', '.join(unplaced)} in {shlex.join(map(str, docs))}"
        )
    return 0


def markdown_pages(paths: Sequence[Path]) -> list[Path]:
    """The Markdown files among ``paths`` and in the folders among them, sorted within each folder."""
    pages = []
    for path in paths:
        if path.is_dir():
            pages.extend(sorted(path.rglob("*.md")))
        elif path.is_file():
            pages.append(path)
        else:
            raise ConfigError(f"--docs {path}: no such file or folder")
    return pages
