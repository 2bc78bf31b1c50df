"""``tools/train.py CONFIG [key=value ...]``: train the experiment a YAML file describes.

Mistakes in the input (a missing file, an unknown key, a wrong type, an
unknown name, missing data, a bad checkpoint) end with one line on stderr
and exit status 2; see :mod:`metateach.errors`. Under ``torchrun`` every
process trains its shard (:mod:`metateach.distributed`) and rank 0 reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    code = _train(argv)
    if _leave_process_group(together=code == 0):
        # Under torchrun: leave now. The interpreter's teardown can abort on gloo's
        # worker threads (SIGABRT, pytorch/pytorch#179291); everything is written
        # and closed by this point.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(argv: Sequence[str] | None) -> int:
    """Parse the command line and run the experiment; the exit status."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a student (and its teacher) as a YAML experiment describes.",
        epilog="Example: python tools/train.py configs/quickstart.yaml train.epochs=5 noise.rate=0.4",
    )
    parser.add_argument("config", help="the experiment's YAML file, e.g. configs/quickstart.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override any setting, e.g. optim.lr=0.05"
    )
    args = parser.parse_args(argv)

    # Imported here so that --help answers at once.
    from metateach.config import load_config
    from metateach.errors import MetateachError, first_line
    from metateach.trainer import Trainer

    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        metrics = trainer.fit()
    except MetateachError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; continue with train.resume=<run folder>", file=sys.stderr)
        return 130
    if not trainer.world.main:  # under torchrun, rank 0 reports
        return 0
    print(
        f"test accuracy: {100 * metrics['test/acc']:.2f}% after {metrics['epoch']} epochs"
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
