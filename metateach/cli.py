"""The ``metateach`` command: ``metateach train | compare | reproduce | bench | fit-mentornet | weight-drift``.

Each subcommand is also a script in ``tools/`` (``python tools/train.py
CONFIG [key=value ...]`` is ``metateach train CONFIG [key=value ...]``).

Mistakes in the input (a missing file, an unknown key, a wrong type, an
unknown name, missing data, a bad checkpoint) end with one line on stderr
and exit status 2; see :mod:`metateach.errors`. Under ``torchrun`` every
process trains its shard (:mod:`metateach.distributed`) and rank 0 reports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main", "train_main"]

EXIT_USAGE = 2

#: subcommand -> (module, function, what it does); each function takes ``(argv, prog)``.
COMMANDS = {
    "train": ("metateach.cli", "train_main", "train one experiment a YAML file describes"),
    "compare": (
        "metateach.lab.compare_cli",
        "main",
        "train a comparison's variants over seeds, tabulate",
    ),
    "reproduce": (
        "metateach.lab.reproduce",
        "main",
        "run a suite of comparisons, write its tables",
    ),
    "bench": ("metateach.lab.bench", "main", "time teaching steps against a plain step"),
    "fit-mentornet": (
        "metateach.teachers.mentornet",
        "main",
        "fit MentorNet-DD's network on a run's sample record",
    ),
    "weight-drift": (
        "metateach.lab.drift",
        "main",
        "split a teacher's weight drift into its updates and the student's steps",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """``metateach COMMAND [...]``: run a subcommand with the rest of the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        module, function, _ = COMMANDS[argv[0]]
        run = getattr(importlib.import_module(module), function)
        return run(argv[1:], prog=f"metateach {argv[0]}")
    parser = argparse.ArgumentParser(
        prog="metateach",
        description="Learning to teach as one bilevel problem.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<14}{what}" for name, (_, _, what) in COMMANDS.items())
        + "\n\n`metateach COMMAND --help` tells more; e.g. metateach train configs/quickstart.yaml",
    )
    parser.add_argument(
        "command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below"
    )
    parser.add_argument("--version", action="version", version=f"metateach {_version()}")
    parser.parse_args(argv)  # only errors and --help/--version get here
    return EXIT_USAGE


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("metateach")
    except PackageNotFoundError:
        return "unknown"


def train_main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    """``metateach train CONFIG [key=value ...]``: train; the exit status."""
    code = _train(argv, prog)
    if _leave_process_group(together=code == 0):
        # Under torchrun: leave now. The interpreter's teardown can abort on gloo's
        # worker threads (SIGABRT, pytorch/pytorch#179291); everything is written
        # and closed by this point.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(argv: Sequence[str] | None, prog: str) -> int:
    """Parse the command line and run the experiment; the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a student (and its teacher) as a YAML experiment describes.",
        epilog="Example: python tools/train.py configs/quickstart.yaml train.epochs=5 noise.rate=0.4",
    )
    parser.add_argument("config", help="the experiment's YAML file, e.g. configs/quickstart.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override any setting, e.g. optim.lr=0.05"
    )
    args = parser.parse_args(argv)

    # Imported here so that --help answers at once.
    from metateach.config import check_overrides, load_config
    from metateach.errors import MetateachError, RunInterrupted, first_line
    from metateach.runtime import stops_on_signals
    from metateach.trainer import Trainer

    try:
        check_overrides(args.overrides)
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        with stops_on_signals(trainer):
            metrics = trainer.fit()
    except MetateachError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if e.filename is None:
            raise
        # The file system refused (permissions, a full disk, a file where a folder goes).
        print(f"error: {e.strerror or first_line(e)}: {e.filename}", file=sys.stderr)
        return EXIT_USAGE
    except RunInterrupted as e:  # SIGINT or SIGTERM, the state saved at a step boundary
        print(e, file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # before training began, or a second Ctrl-C
        print("interrupted; continue with train.resume=<run folder>", file=sys.stderr)
        return 130
    if not trainer.world.main:  # under torchrun, rank 0 reports
        return 0
    print(
        f"test accuracy: {100 * metrics['test/acc']:.2f}% after {metrics['trainer/epoch']} epochs"
        f"{' (stopped at the target)' if trainer.state.stopped else ''}; "
        f"{100 * trainer.state.test_acc_at_best:.2f}% at the best validation epoch ({trainer.state.best_epoch})"
    )
    print(f"run folder: {trainer.run_dir}")
    if trainer.logger.wandb_dir and cfg.logging.wandb == "offline":
        print(f"W&B offline run: upload it with `wandb sync {trainer.logger.wandb_dir}`")
    return 0


def _leave_process_group(together: bool) -> bool:
    """End torchrun's process group, if this process joined one; whether it had.

    With ``together`` (this rank finished, as every rank should have), the
    ranks first wait for each other, so that none tears the group down while
    another still talks to it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if together:
        dist.barrier()
    dist.destroy_process_group()
    return True


if __name__ == "__main__":
    sys.exit(main())
