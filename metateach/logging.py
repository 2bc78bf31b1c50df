"""All of a run's logging: Weights & Biases and a local JSON-lines file.

The local file (``metrics.jsonl`` in the run folder, one record per line
with its ``step``) is the record of truth: a run can be read without W&B,
and a resumed run drops the records past its checkpoint so that nothing is
counted twice. W&B is offline by default; ``wandb sync <run>/wandb/offline-*``
uploads a run later. If W&B fails, the run warns once and goes on with the
local file.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metateach.config import flatten
from metateach.errors import first_line

if TYPE_CHECKING:
    import torch

    from metateach.config import ExperimentConfig, LoggingConfig
    from metateach.data import DataBundle

__all__ = [
    "RunLogger",
    "read_metrics",
    "log_run_start",
    "log_comparison",
    "read_summary",
    "current_names",
    "prefixed",
    "axis_of",
]

METRICS_FILE = "metrics.jsonl"

#: The x-axis W&B draws each metric against: the first rule whose prefix the name starts
#: with. Every record carries ``trainer/step``; epoch records carry ``trainer/epoch`` and
#: ``trainer/samples_learned``, the episodes' records ``trainer/episode``.
AXES = (
    ("trainer/", None),  # the axes themselves and the run's counts
    ("step/", "trainer/step"),  # recorded every logging.every_steps steps
    ("eval/", "trainer/samples_learned"),  # validation against the data learned from
    ("episode/", "trainer/episode"),
    ("", "trainer/epoch"),  # train/, val/, test/, teacher/, lesson/, noise/, perf/, ...
)
#: What a metric's W&B summary keeps, where the last value would mislead.
SUMMARIES = {"val/acc": "max", "val/loss": "min", "eval/val_acc": "max"}


#: Names of metrics before their namespaces (metateach before issue 26) -> their names now:
#: records, summaries and checkpoints of older runs are read under today's names.
RENAMED = {
    "epoch": "trainer/epoch",
    "episode": "trainer/episode",
    "lr": "train/lr",
    "throughput/samples_per_s": "perf/samples_per_s",
    "train/learned_samples": "trainer/samples_learned",
    "train/examined_samples": "trainer/samples_examined",
    "eval/learned_samples": "trainer/samples_learned",
    "train/running_loss": "step/train_loss",
    "train/nonfinite_step": "step/nonfinite",
    "resumed_with_changes": "trainer/resumed_with_changes",
    "best/test_acc": "test/acc_at_best_val",
    "best/val_acc": "val/best_acc",
    "best/epoch": "trainer/best_epoch",
    "steps": "trainer/steps",
    "learned_samples": "trainer/samples_learned",
    "examined_samples": "trainer/samples_examined",
    "episodes": "trainer/episodes",
    "episode/learned_samples": "episode/samples_learned",
    "episode/examined_samples": "episode/samples_examined",
    "target/samples": "target/samples_learned",
    "target/examined_samples": "target/samples_examined",
}


def current_names(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` (a metrics record, a summary) with any name of :data:`RENAMED` renamed."""
    return {RENAMED.get(name, name): value for name, value in record.items()}


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's ``summary.json``, under today's names."""
    return current_names(json.loads((Path(run_dir) / "summary.json").read_text()))


def axis_of(name: str) -> str | None:
    """The W&B x-axis of the metric ``name`` (:data:`AXES`); None for an axis itself."""
    return next(axis for prefix, axis in AXES if name.startswith(prefix))


def prefixed(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with every name under ``prefix``."""
    return {prefix + name: value for name, value in metrics.items()}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``, in order, under today's names (a torn last line
    is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(current_names(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return records


class RunLogger:
    """Sends metrics, images and the summary to the local file and to W&B.

    Args:
        run_dir: the run folder; W&B writes under ``run_dir/wandb``.
        config: the resolved configuration, stored with the W&B run.
        settings: the ``logging`` section.
        run_name: the default W&B name.
        resume_step: when resuming, the checkpoint's step; later records are dropped.
        wandb_id: when resuming, the W&B run to continue.
    """

    def __init__(
        self,
        run_dir: Path,
        config: Mapping[str, Any],
        settings: LoggingConfig,
        run_name: str,
        resume_step: int | None = None,
        wandb_id: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.metrics_path, "a")  # noqa: SIM115 - closed in close()
        self._wandb: Any = None
        self._warned = False
        self._defined: set[str] = set()  # names W&B has been given an axis for
        #: The W&B run's folder, what ``wandb sync`` takes (None without W&B).
        self.wandb_dir: str | None = None
        if settings.wandb != "disabled":
            self._start_wandb(config, settings, run_name, wandb_id)

    @property
    def wandb_id(self) -> str | None:
        return None if self._wandb is None else self._wandb.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` at ``step`` locally and in W&B (each new name given its
        axis, :func:`axis_of`, the first time it is seen)."""

        def send(run: Any) -> None:
            self._define(run, metrics)
            run.log({"trainer/step": step, **metrics}, step=step)

        self._write(metrics, step)
        self._to_wandb(send)

    def log_facts(self, facts: Mapping[str, Any], step: int) -> None:
        """Numbers that describe the run rather than follow it (the data's sizes, the noise
        realized): a record of the local file, and part of the W&B run's config."""
        self._write(facts, step)
        self._to_wandb(lambda run: run.config.update(dict(facts), allow_val_change=True))

    def _write(self, metrics: Mapping[str, Any], step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _define(self, run: Any, names: Iterable[str]) -> None:
        """Give W&B the axis (and summary) of each name it has not seen (:data:`AXES`)."""
        for name in set(names) - self._defined:
            axis = axis_of(name)
            if axis is None:
                run.define_metric(name, hidden=True)
            else:
                run.define_metric(name, step_metric=axis, summary=SUMMARIES.get(name))
            self._defined.add(name)

    def log_media(self, media: Mapping[str, Any], step: int) -> None:
        """W&B objects (histograms, tables, plots) at ``step``, for W&B alone: the run folder
        keeps what they show in its own files (``diagnostics/``, ``metrics.jsonl``). Each is a
        function that builds its object from the ``wandb`` module, so that a run without W&B
        never imports it."""

        def send(run: Any) -> None:
            import wandb

            self._define(run, media)
            run.log({k: build(wandb) for k, build in media.items()}, step=step)

        self._to_wandb(send)

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Attach a PNG already saved in the run folder to W&B."""
        self.log_media({key: lambda wandb: wandb.Image(str(path))}, step)

    def log_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        """A checkpoint as a W&B artifact (type ``model``), ``metadata`` beside it: one artifact a
        run, a version for each save, aliased by the file's name (``last``, ``best``)."""

        def send(run: Any) -> None:
            import wandb

            artifact = wandb.Artifact(
                f"checkpoint-{run.id}", type="model", metadata=_jsonable_tree(metadata)
            )
            artifact.add_file(str(path))
            run.log_artifact(artifact, aliases=[path.stem])

        self._to_wandb(send)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Final numbers: ``summary.json`` in the run folder and the W&B summary (where a
        metric's summary is its best, :data:`SUMMARIES`, W&B keeps that one)."""
        (self.run_dir / "summary.json").write_text(
            json.dumps({k: _jsonable(v) for k, v in metrics.items()}, indent=2) + "\n"
        )
        kept = {k: v for k, v in metrics.items() if k not in SUMMARIES}
        self._to_wandb(lambda run: run.summary.update(kept))

    def close(self) -> None:
        self._file.close()
        self._to_wandb(lambda run: run.finish())
        self._wandb = None

    def _start_wandb(
        self,
        config: Mapping[str, Any],
        settings: LoggingConfig,
        run_name: str,
        wandb_id: str | None,
    ) -> None:
        try:
            import wandb

            self._wandb = wandb.init(
                mode=settings.wandb,
                dir=str(self.run_dir),
                project=settings.project,
                entity=settings.entity,
                name=settings.name or run_name,
                group=settings.group,
                job_type=settings.job_type,
                tags=list(settings.tags),
                config=flatten(config),
                id=wandb_id,
                resume="allow" if wandb_id else None,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )
            self.wandb_dir = str(Path(self._wandb.dir).parent)
        except Exception as e:  # noqa: BLE001 - W&B must never take the run down
            self._warn(f"W&B could not start ({type(e).__name__}: {first_line(e)})")

    def _to_wandb(self, action: Any) -> None:
        if self._wandb is None:
            return
        try:
            action(self._wandb)
        except Exception as e:  # noqa: BLE001
            self._warn(f"W&B failed ({type(e).__name__}: {first_line(e)})")
            self._wandb = None

    def _warn(self, message: str) -> None:
        if not self._warned:
            print(f"warning: {message}; metrics go to {self.metrics_path} only", file=sys.stderr)
            self._warned = True


class SilentLogger(RunLogger):
    """A logger that records nothing: what a data-parallel run's ranks other than 0 hold, and a
    quiet replay (:class:`~metateach.trainer.Trainer`'s ``quiet``)."""

    def __init__(self, run_dir: Path, wandb_id: str | None = None) -> None:  # no file, no W&B
        self.run_dir = run_dir
        self.metrics_path = run_dir / METRICS_FILE
        self._wandb = None
        self._warned = False
        self.wandb_dir = None
        self._wandb_id = wandb_id

    @property
    def wandb_id(self) -> str | None:
        """The W&B run this run continues, kept for its checkpoints (given by a quiet replay)."""
        return self._wandb_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        pass

    def log_facts(self, facts: Mapping[str, Any], step: int) -> None:
        pass

    def log_media(self, media: Mapping[str, Any], step: int) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _jsonable_tree(value: Any) -> Any:
    """``value`` with every leaf :func:`_jsonable` (metadata W&B stores as JSON)."""
    if isinstance(value, Mapping):
        return {k: _jsonable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable_tree(v) for v in value]
    return _jsonable(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def log_run_start(
    cfg: ExperimentConfig,
    data: DataBundle,
    model: torch.nn.Module,
    device: torch.device,
    run_dir: Path,
    logger: RunLogger,
) -> None:
    """One line on what is trained where, the data's sizes and realized noise, and the noise matrix figure."""
    from tqdm.auto import tqdm

    from metateach.report.plots import plot_transition_matrix

    params = sum(p.numel() for p in model.parameters())
    noise = (
        f"{cfg.noise.type} noise at {cfg.noise.rate:.0%}: {data.noise.realized_rate:.2%} of labels changed"
        if cfg.noise.type != "none"
        else "clean labels"
    )
    tqdm.write(
        f"{cfg.data.name}: {len(data.train)} train ({noise}), {len(data.val)} val, {len(data.test)} test | "
        f"{cfg.model.name}: {params / 1e6:.3f}M parameters on {device} | run folder {run_dir}"
    )
    logger.log_facts(data.summary(), 0)
    if cfg.logging.plots and cfg.noise.type != "none":
        path = plot_transition_matrix(
            data.noise.empirical,
            data.noise.promised,
            data.info.classes,
            f"{cfg.noise.type} noise, rate {cfg.noise.rate}: {data.noise.realized_rate:.2%} changed",
            run_dir / "noise_transition.png",
        )
        logger.log_image("noise/transition", path, 0)


def log_comparison(
    name: str,
    rows: Sequence[Mapping[str, Any]],
    paper: Mapping[str, float],
    settings: LoggingConfig,
    folder: Path,
) -> None:
    """A comparison's table in W&B: a run of its own in the comparison's group (job type
    ``summary``) holding the table (``comparison/table``: per variant its runs and each
    metric's mean and std, and the paper's number where the comparison gives one) and a bar
    chart of the mean test accuracy (``comparison/test_acc``). Nothing without W&B; a W&B
    failure warns and changes nothing else."""
    if settings.wandb == "disabled" or not rows:
        return
    metrics = [k for k in rows[0] if k not in ("variant", "runs")]
    columns = ["variant", "runs", *metrics, "paper"]
    data = [
        [row["variant"], row["runs"], *(row.get(k) for k in metrics), paper.get(row["variant"])]
        for row in rows
    ]
    try:
        import wandb

        with wandb.init(
            mode=settings.wandb,
            dir=str(folder),
            project=settings.project,
            entity=settings.entity,
            name=f"{name}-summary",
            group=name,
            job_type="summary",
            tags=list(settings.tags),
            config={"comparison": name, **prefixed("paper/", paper)},
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        ) as run:
            table = wandb.Table(columns=columns, data=data)
            run.log({
                "comparison/table": table,
                "comparison/test_acc": wandb.plot.bar(
                    table, "variant", "test/acc", title=f"{name}: test accuracy (%), mean over seeds"
                ),
            })  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the comparison's own files are written already
        print(f"warning: the comparison's W&B run failed ({type(e).__name__}: {first_line(e)})",
              file=sys.stderr)  # fmt: skip
