"""Where a run lives, and whether a checkpoint belongs to the run being started."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]

from metateach.checkpoint import LAST, checkpoint_path, load_checkpoint, remove_stale_writes
from metateach.config import ExperimentConfig, config_to_dict, flatten
from metateach.distributed import World, from_main
from metateach.errors import CheckpointError, ConfigError

__all__ = [
    "RunLock", "new_run_dir", "open_run", "check_same_experiment", "changed_settings", "unfinished",
]  # fmt: skip

#: Settings that define the experiment: a checkpoint only resumes a run that agrees on them.
#: Everything else (epochs, device, logging, ...) may change between the two.
MUST_MATCH = (
    "data.",
    "noise.",
    "model.",
    "optim.",
    "schedule.",
    "teacher.",
    "train.seed",
    "train.batch_size",
)
#: Settings under :data:`MUST_MATCH` that say where the data are, not what they are: data
#: moved, or named by another path (relative or absolute), is still the same experiment.
MAY_DIFFER = ("data.root", "data.download")


class FolderInUse(ConfigError):
    """Another process holds the run folder's lock."""


#: The file a run folder's owner holds locked while it trains there.
LOCK = ".lock"


class RunLock:
    """An exclusive lock on a run folder: one process trains in it at a time.

    The folder is made if need be; the lock is an ``flock`` on ``<folder>/.lock``,
    which the operating system drops when its holder ends, however it ends, so
    a lock is never stale. Without ``fcntl`` (not POSIX) there is no lock.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._file = open(folder / LOCK, "a+")  # noqa: SIM115 - held for the run's life
        except OSError as e:
            at = f" ({e.filename})" if e.filename and str(e.filename) != str(folder) else ""
            raise ConfigError(
                f"cannot make the run folder {folder} (train.out_dir): {e.strerror or e}{at}"
            ) from None
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise FolderInUse(
                f"run folder {folder} is in use by another run (process {holder}); wait for it "
                "to end, or choose another train.run_name"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        """Let another process train in the folder (the lock file stays, unlocked)."""
        self._file.close()  # closing drops the flock


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds anything of a run (its lock file aside)."""
    return folder.is_dir() and any(p.name != LOCK for p in folder.iterdir())


def new_run_dir(cfg: ExperimentConfig) -> tuple[Path, RunLock]:
    """``<train.out_dir>/<train.run_name>``, or ``<config>-<time>`` made unique; locked.

    A named folder that already holds a run, or that another process is
    training in, is an error, never overwritten.
    """
    out = Path(cfg.train.out_dir)
    if cfg.train.run_name:
        path = out / cfg.train.run_name
        lock = RunLock(path)
        if holds_run(path):
            lock.release()
            how = (
                f"continue it with train.resume={path}"
                if checkpoint_path(path).is_file()
                else "it holds no checkpoint (its run stopped before saving one): delete it to "
                "start again"
            )
            raise ConfigError(
                f"run folder {path} already exists; {how}, or choose another train.run_name"
            )
        return path, lock
    stem = Path(cfg.source).stem if cfg.source else "run"
    base = out / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for n in itertools.count():
        path = base if n == 0 else base.with_name(f"{base.name}-{n}")
        if holds_run(path):
            continue
        try:
            lock = RunLock(path)
        except FolderInUse:  # another run took this name just now
            continue
        if not holds_run(path):
            return path, lock
        lock.release()
    raise AssertionError("unreachable")


def open_run(
    cfg: ExperimentConfig, world: World
) -> tuple[Path, dict[str, Any] | None, RunLock | None]:
    """The run's folder, the checkpoint it resumes from (None for a new run), and its lock.

    A resumed run stays in its own folder, once its checkpoint is shown to
    belong to this experiment; a loose checkpoint (a ``.pt`` outside a run's
    ``checkpoints/``) resumes into a new folder under ``train.out_dir``. Rank 0
    makes and locks the folder (the lock is None on the other ranks).
    """
    resume = cfg.train.resume
    resumed = None
    if resume:
        file = checkpoint_path(resume)
        resumed = load_checkpoint(resume)  # a run folder without one is named as such
        check_same_experiment(
            resumed["config"], config_to_dict(cfg), file, cfg.train.resume_with_changes
        )
        if file.parent.name == "checkpoints":  # the run's own folder
            folder = file.parent.parent
            if cfg.train.run_name not in (None, folder.name):
                raise ConfigError(
                    f"train.run_name={cfg.train.run_name!r} cannot rename the run that "
                    f"train.resume={resume} continues in its folder {folder}: drop train.run_name "
                    "(it names the new folder only when resuming a loose checkpoint)"
                )
            if not world.main:
                return folder, resumed, None
            lock = RunLock(folder)
            stale = remove_stale_writes(file.parent)  # writes cut short by a kill
            if stale:
                print(f"removed {len(stale)} unfinished checkpoint write(s) of an earlier process "
                      f"from {file.parent}", file=sys.stderr)  # fmt: skip
            return folder, resumed, lock
    locks: list[RunLock] = []

    def make() -> Path:
        path, lock = new_run_dir(cfg)
        locks.append(lock)
        return path

    return from_main(world, make), resumed, locks[0] if locks else None


def unfinished(cfg: ExperimentConfig, folder: Path) -> bool:
    """Whether the run in ``folder`` has yet to finish; one cut short is set to resume from there.

    A run is finished once it has written its ``summary.json``; otherwise, with
    a last checkpoint, ``cfg.train.resume`` points at the folder.
    """
    if (folder / "summary.json").is_file():
        return False
    if (folder / "checkpoints" / LAST).is_file():
        cfg.train.resume = str(folder)
    return True


def check_same_experiment(
    saved: dict[str, Any], current: dict[str, Any], file: Path, may_change: Sequence[str] = ()
) -> None:
    """Refuse a checkpoint whose experiment differs from the config in a :data:`MUST_MATCH` setting
    not listed in ``may_change`` (keys or whole sections)."""
    for key, (before, now) in changed_settings(saved, current).items():
        if not any(key == k or key.startswith(f"{k}.") for k in may_change):
            raise CheckpointError(
                f"checkpoint {file} belongs to a different experiment: {key} was {before!r}, the "
                f"config now says {now!r} (to continue it with this change on purpose, add "
                f"train.resume_with_changes=[{key}])"
            )


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The settings that define the experiment and differ: key -> (saved value, value now)."""
    before, now = flatten(saved), flatten(current)
    return {
        key: (before.get(key), now.get(key))
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and key.startswith(MUST_MATCH) and key not in MAY_DIFFER
    }
