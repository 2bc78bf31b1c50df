"""Where a run lives, and whether a checkpoint belongs to the run being started."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from metateach.checkpoint import LAST, checkpoint_path, load_checkpoint
from metateach.config import ExperimentConfig, config_to_dict
from metateach.distributed import World, from_main
from metateach.errors import CheckpointError, ConfigError

__all__ = ["new_run_dir", "resumed_run_dir", "check_same_experiment"]

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


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """``<train.out_dir>/<train.run_name>``, or ``<config>-<time>`` made unique.

    A named folder that already holds a run is an error, never overwritten.
    """
    out = Path(cfg.train.out_dir)
    if cfg.train.run_name:
        path = out / cfg.train.run_name
        if path.exists() and any(path.iterdir()):
            raise ConfigError(
                f"run folder {path} already exists; continue it with train.resume={path} "
                "or choose another train.run_name"
            )
        return path
    stem = Path(cfg.source).stem if cfg.source else "run"
    base = out / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def open_run(cfg: ExperimentConfig, world: World) -> tuple[Path, dict[str, Any] | None]:
    """The run's folder, and the checkpoint it resumes from (None for a new run).

    A resumed run stays in its own folder, once its checkpoint is shown to
    belong to this experiment; a new run's folder is made by rank 0.
    """
    resume = cfg.train.resume
    if not resume:
        return from_main(world, lambda: new_run_dir(cfg)), None
    resumed = load_checkpoint(resume)
    check_same_experiment(resumed["config"], config_to_dict(cfg), checkpoint_path(resume))
    return resumed_run_dir(resume), resumed


def resumed_run_dir(resume: str) -> Path:
    """The run folder a ``train.resume`` path (a run folder or a checkpoint in it) belongs to."""
    file = checkpoint_path(resume)
    return file.parent.parent if file.parent.name == "checkpoints" else file.parent


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


def check_same_experiment(saved: dict[str, Any], current: dict[str, Any], file: Path) -> None:
    """Refuse a checkpoint whose experiment differs from the config in a :data:`MUST_MATCH` setting."""
    before, now = _flatten(saved), _flatten(current)
    for key in sorted(before.keys() | now.keys()):
        differs = before.get(key) != now.get(key)
        if differs and key.startswith(MUST_MATCH) and key not in MAY_DIFFER:
            raise CheckpointError(
                f"checkpoint {file} belongs to a different experiment: {key} was {before.get(key)!r}, "
                f"the config now says {now.get(key)!r}"
            )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
