"""``tools/compare.py COMPARISON [key=value ...]``: train every variant over every seed, then tabulate.

Results go to ``<train.out_dir or runs>/<comparison>/``: one run folder per
(variant, seed), ``results.json`` with every run's summary, ``results.md``
with the table (mean +- std over seeds), and ``results.png``; runs with a
target accuracy add how fast each got there, and ``results_speed.png``, the
validation accuracy against training samples of every run. Run it again
to finish an interrupted comparison: completed runs are reused. ``--jobs N``
trains N runs at once.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "report_interrupted", "sigterm_exits"]


def report_interrupted(signum: int) -> int:
    """Say that signal ``signum`` stopped the command and how to go on; the exit status."""
    name = signal.Signals(signum).name
    print(
        f"stopped by {name}, any run in progress saved at a step boundary: "
        "run the same command again to continue",
        file=sys.stderr,
    )
    return 128 + signum


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """A polite kill (SIGTERM) ends the block as Ctrl-C does, so that worker processes stop too.

    A run training in this process meanwhile takes the signal itself
    (:func:`metateach.train`): it stops at a step boundary, saved, and raises
    :class:`~metateach.errors.RunInterrupted`, which the command reports.
    """

    def leave(signum: int, frame: Any) -> None:
        sys.exit(report_interrupted(signum))

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None, prog: str = "compare.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "comparison", help="a comparison file, e.g. configs/compare/mnist_noisy40.yaml"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    parser.add_argument(
        "--out", default="runs", help="where the comparison's folder goes (default: runs)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs to train at once, in processes of their own (default: 1)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run (and tabulate) only these of the comparison's seeds",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    from metateach.config import check_overrides
    from metateach.errors import ConfigError, MetateachError, RunInterrupted, first_line
    from metateach.lab.compare import load_comparison, run_comparison
    from metateach.lab.results import write_results

    try:
        with sigterm_exits():
            check_overrides(args.overrides)
            comparison = load_comparison(args.comparison)
            if args.seeds:
                if unknown := sorted(set(args.seeds) - set(comparison.seeds)):
                    raise ConfigError(
                        f"--seeds {unknown[0]} is not among the comparison's seeds {comparison.seeds}"
                    )
                comparison.seeds = [s for s in comparison.seeds if s in args.seeds]
            folder = Path(args.out) / comparison.name
            results = run_comparison(comparison, folder, args.overrides, jobs=args.jobs)
    except MetateachError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except RunInterrupted as e:  # a run of this process stopped at a step boundary, saved
        return report_interrupted(e.signum)
    except KeyboardInterrupt:  # Ctrl-C to the command, its workers saved
        return report_interrupted(signal.SIGINT)
    table = write_results(comparison, folder, results, args.overrides)
    print(table)
    print(f"\nresults: {folder}/results.md, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
