"""Where a teacher's weights drift: the teacher's own updates, the student's steps, or both.

A weighting teacher's mean weight on clean and on mislabeled samples moves
as the run goes, and two things move it: the teacher's updates change the
map from a sample to its weight, and the student's steps change what the
map reads. :func:`weight_drift` separates them. It trains a run to a step
(in a folder of its own, resumable), then continues it by two arms from
that state, reading the teacher's weights on a fixed sample of training
images after every student step:

- **learning**: the run as configured. Each step's change in the mean
  weights is split into the teacher's part (its update, read on the
  student it was computed for) and the student's part (the step, read by
  the updated teacher); the split in the other order is kept too. The
  teacher as it was at the start also reads this arm's student.
- **held**: the same run with ``teacher.learn=false``: the student's steps
  under the teacher held at its starting state.

The weights are read as the diagnostics read them (:mod:`metateach.report.diagnostics`):
the lesson's weights, scaled to mean one over the sample.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from metateach.config import check_overrides, load_config
from metateach.data import Batch, DataBundle
from metateach.engine.problem import BilevelProblem
from metateach.errors import ConfigError, MetateachError, RunInterrupted, first_line
from metateach.lab.compare_cli import report_interrupted
from metateach.report.plots import plot_weight_drift
from metateach.runtime import stops_on_signals
from metateach.trainer import Trainer
from metateach.types import TeachingContext

__all__ = ["DriftRecord", "WeightProbe", "main", "weight_drift"]


class WeightProbe:
    """A fixed sample of training images on which to read a teacher's weights.

    Args:
        data: the run's data.
        count: images to read (at most the training split).
        seed: chooses them.
        batch_size: images per forward pass.
    """

    def __init__(self, data: DataBundle, count: int, seed: int, batch_size: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.index = torch.randperm(len(data.train), generator=generator)[:count]
        self.data = data
        self.noisy = data.train.is_noisy[self.index]
        if self.noisy.all() or not self.noisy.any():
            raise ConfigError(
                f"the weight probe's {count} training images are all "
                f"{'mislabeled' if self.noisy.all() else 'clean'}: the drift compares the two "
                "(set noise.rate between 0 and 1, or a larger --probe)"
            )
        self.batch_size = batch_size

    def read(
        self,
        problem: BilevelProblem,
        params: dict[str, Tensor],
        teacher: nn.Module,
        context: TeachingContext,
    ) -> np.ndarray:
        """The mean weight ``teacher`` gives the clean and the mislabeled images, the student at ``params``."""
        weights = []
        with problem.own_rng(), torch.no_grad():
            for start in range(0, len(self.index), self.batch_size):
                index = self.index[start : start + self.batch_size]
                batch = Batch(
                    self.data.normalize(self.data.train.images[index].to(problem.device)),
                    self.data.train.targets[index].to(problem.device),
                    index.to(problem.device),
                )
                view = problem.view(problem.states(params, batch.x, real=False), batch, context)
                lesson = teacher(batch, view)
                if lesson.weights is None:
                    raise ConfigError(
                        f"teacher {type(teacher).__name__} gives no per-sample weights; the weight "
                        "drift reads a weighting teacher's (e.g. deep_interaction, meta_weight_net)"
                    )
                weights.append(lesson.weights.detach().double().cpu())
        w = torch.cat(weights)
        w = w / w.mean().clamp(min=1e-300)
        return np.array([w[~self.noisy].mean().item(), w[self.noisy].mean().item()])


@dataclass
class DriftRecord:
    """A drift measurement, one row a student step (row 0: the start). Columns: clean, mislabeled."""

    steps: list[int]  # the run's global step after each row's step
    learning: list[list[float]]  # the learning arm: its teacher reading its student
    start_teacher: list[list[float]]  # the starting teacher reading the learning arm's student
    held: list[list[float]]  # the held arm: the starting teacher reading its own student
    teacher_part: list[list[float]]  # the learning arm's change so far from the teacher's updates
    student_part: list[list[float]]  # ... from the student's steps, read by the updated teacher
    teacher_part_after: list[list[float]]  # the teacher's updates read after the student's step
    student_part_before: list[list[float]]  # the student's steps read by the old teacher

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: Path) -> DriftRecord:
        return cls(**json.loads(path.read_text()))

    def table(self, every: int) -> str:
        """A Markdown table of the clean images' mean weight every ``every`` steps."""
        rows = [
            "| step | learning | held teacher | starting teacher on the learning student "
            "| teacher's part | student's part |",
            "|---|---|---|---|---|---|",
        ]
        last = len(self.steps) - 1
        for i in sorted({*range(0, last + 1, max(every, 1)), last}):
            rows.append(
                f"| {self.steps[i]} | {self.learning[i][0]:.3f} | {self.held[i][0]:.3f} "
                f"| {self.start_teacher[i][0]:.3f} "
                f"| {_span(self.teacher_part[i][0], self.teacher_part_after[i][0])} "
                f"| {_span(self.student_part[i][0], self.student_part_before[i][0])} |"
            )
        return "\n".join(rows)


def _span(a: float, b: float) -> str:
    """Two orders of the split as one figure, or their range."""
    low, high = sorted((a, b))
    return f"{low:+.3f}" if f"{low:+.3f}" == f"{high:+.3f}" else f"{low:+.3f} to {high:+.3f}"


def _params(problem: BilevelProblem) -> dict[str, Tensor]:
    return {k: p.detach().clone() for k, p in problem.params().items()}


def weight_drift(
    config: str | Path,
    overrides: Sequence[str],
    start: int,
    steps: int,
    probe: int = 1000,
    seed: int = 0,
) -> tuple[DriftRecord, Path]:
    """Train ``config`` to step ``start``, then read ``steps`` more by both arms (see the module).

    The run to ``start`` goes to ``<train.out_dir>/<train.run_name>-drift<start>``,
    where a second call finds it (and continues it if it stopped short);
    each arm trains a copy of it, so the folder stays at ``start``. Returns
    the record and that folder, which receives ``drift.json`` and ``drift.png``.
    With a teacher whose steps span several student steps, a run stops at
    the first step boundary from its mark where it can be saved.
    """
    if start < 1 or steps < 1:
        raise ConfigError(f"--start and --steps must be at least 1, got {start} and {steps}")
    base = load_config(config, overrides)
    if base.teacher.name in (None, "none") or not base.teacher.learn:
        raise ConfigError(
            f"teacher.name={base.teacher.name!r} with teacher.learn={base.teacher.learn}: the weight "
            "drift follows a teacher that learns (e.g. deep_interaction, meta_weight_net)"
        )
    name = f"{base.train.run_name or Path(config).stem}-drift{start}"
    folder = Path(base.train.out_dir) / name
    quiet = ["logging.wandb=disabled", "logging.diagnostics=false", "logging.plots=false"]

    def trainer(run_name: str, extra: Sequence[str] = ()) -> Trainer:
        here = folder.parent / run_name
        resume = here if (here / "checkpoints").is_dir() else "null"
        cfg = load_config(config, [
            *overrides, *quiet, f"train.out_dir={folder.parent}", f"train.run_name={run_name}",
            f"train.resume={resume}", *extra,
        ])  # fmt: skip
        return Trainer(cfg)

    run = trainer(name)
    try:  # refused before any training
        reader = WeightProbe(run.data, probe, seed, base.train.eval_batch_size)
        problem = run.teaching.strategy.problem
        assert problem.teacher is not None
        if not problem.teacher_params():
            raise ConfigError(
                f"teacher {base.teacher.name!r} has no parameters of its own: its weights come "
                "from each step's hypergradient, not from a map that could drift"
            )
        reader.read(problem, _params(problem), problem.teacher, run.context())
        if run.state.global_step > start:
            raise ConfigError(
                f"{folder} holds the run at step {run.state.global_step}, past --start {start}: "
                "remove the folder to train it again"
            )
    except BaseException:
        run.close()
        raise
    if run.state.global_step < start:
        with stops_on_signals(run):  # stopped, it is saved: the next call continues it
            run.fit(max_steps=start - run.state.global_step)
    else:
        run.close()

    learning = trainer(_arm(folder, "learning"))
    record = _learning_arm(learning, reader, steps)
    held = trainer(
        _arm(folder, "held"), ["teacher.learn=false", "train.resume_with_changes=[teacher.learn]"]
    )
    record.held = _held_arm(held, reader, steps)
    count = min(len(record.steps), len(record.held))
    for key, values in asdict(record).items():
        setattr(record, key, values[:count])
    record.save(folder / "drift.json")
    plot_weight_drift(record, f"{name} from step {record.steps[0]}", folder / "drift.png")
    return record, folder


def _arm(folder: Path, arm: str) -> str:
    """A fresh copy of the run at the start for one arm, beside it; the copy's run name."""
    copied = folder.with_name(f"{folder.name}-{arm}")
    shutil.rmtree(copied, ignore_errors=True)
    shutil.copytree(folder / "checkpoints", copied / "checkpoints")
    return copied.name


def _learning_arm(run: Trainer, probe: WeightProbe, steps: int) -> DriftRecord:
    problem = run.teaching.strategy.problem
    assert problem.teacher is not None
    start_teacher = copy.deepcopy(problem.teacher)
    params, teacher = _params(problem), start_teacher  # neither changes in place
    first = probe.read(problem, params, teacher, run.context())
    zero = np.zeros(2)
    parts = {
        k: [zero]
        for k in ("teacher_part", "student_part", "teacher_part_after", "student_part_before")
    }
    steps_, learning, by_start = [run.state.global_step], [first], [first]
    before = first

    def on_step() -> None:
        nonlocal params, teacher, before
        context = run.context()
        now_params, now_teacher = _params(problem), problem.teacher
        assert now_teacher is not None
        now = probe.read(problem, now_params, now_teacher, context)
        old_student = probe.read(problem, params, now_teacher, context)
        old_teacher = probe.read(problem, now_params, teacher, context)
        for key, change in (
            ("teacher_part", old_student - before),
            ("student_part", now - old_student),
            ("teacher_part_after", now - old_teacher),
            ("student_part_before", old_teacher - before),
        ):
            parts[key].append(parts[key][-1] + change)
        steps_.append(run.state.global_step)
        learning.append(now)
        by_start.append(probe.read(problem, now_params, start_teacher, context))
        params, teacher, before = now_params, copy.deepcopy(now_teacher), now

    run.fit(max_steps=steps, on_step=on_step)
    return DriftRecord(
        steps=steps_, learning=_rows(learning), start_teacher=_rows(by_start), held=[],
        **{k: _rows(v) for k, v in parts.items()},
    )  # fmt: skip


def _rows(readings: list[np.ndarray]) -> list[list[float]]:
    return [r.tolist() for r in readings]


def _held_arm(run: Trainer, probe: WeightProbe, steps: int) -> list[list[float]]:
    problem = run.teaching.strategy.problem
    assert problem.teacher is not None
    teacher = problem.teacher
    readings = [probe.read(problem, _params(problem), teacher, run.context()).tolist()]

    def on_step() -> None:
        readings.append(probe.read(problem, _params(problem), teacher, run.context()).tolist())

    run.fit(max_steps=steps, on_step=on_step)
    return readings


def main(argv: Sequence[str] | None = None, prog: str = "weight_drift.py") -> int:
    """``tools/weight_drift.py CONFIG --start STEP --steps N [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Split the drift of a teacher's weights on clean and mislabeled images into "
        "the teacher's updates and the student's steps.",
        epilog="Example: python tools/weight_drift.py results/cpu_deep_interaction/"
        "mnist_deep_interaction_ablations/table7_k1_b1-seed0/config.yaml --start 1770 --steps 550 "
        "data.root=../shared/data train.out_dir=runs",
    )
    parser.add_argument("config", help="an experiment: a run's config.yaml, or one in configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to the run")
    parser.add_argument("--start", type=int, required=True, help="the student step to read from")
    parser.add_argument("--steps", type=int, required=True, help="student steps to read")
    parser.add_argument(
        "--probe", type=int, default=1000, help="training images read (default: 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="chooses the images (default: 0)")
    parser.add_argument(
        "--every", type=int, help="steps between the table's rows (default: a tenth of --steps)"
    )
    args = parser.parse_intermixed_args(argv)

    try:
        check_overrides(args.overrides)
        record, folder = weight_drift(
            args.config, args.overrides, args.start, args.steps, args.probe, args.seed
        )
    except MetateachError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        return report_interrupted(e.signum)
    print("mean weight of the clean images (mean 1 over the probe; the two parts add up to the")
    print("learning arm's change, each in both orders of the split):\n")
    print(record.table(args.every or max(args.steps // 10, 1)))
    print(
        f"\nmislabeled images: {record.learning[0][1]:.3f} -> {record.learning[-1][1]:.3f} (learning), "
        f"{record.held[-1][1]:.3f} (held)"
    )
    print(f"results: {folder}/drift.json, drift.png")
    return 0
