"""The training loop: it learns, it logs, it checkpoints, and it resumes exactly."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from metateach.checkpoint import load_checkpoint, save_checkpoint
from metateach.errors import CheckpointError, ConfigError, MetateachError
from metateach.logging import read_metrics
from metateach.progress import TrainState
from metateach.trainer import Trainer

from .conftest import without_measurements


def epoch_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "trainer/epoch" in r]


def test_a_student_learns_the_digits_and_the_run_folder_holds_everything(make_config) -> None:
    cfg = make_config(
        "train.epochs=4",
        "noise.type=symmetric",
        "noise.rate=0.2",
        "logging.plots=true",
        "train.run_name=learn",
    )
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    assert metrics["test/acc"] > 0.85  # chance is 0.10
    assert metrics["val/acc"] > 0.85
    run = trainer.run_dir
    assert run.name == "learn"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["noise"] == {"type": "symmetric", "rate": 0.2, "imbalance_factor": 1.0, "seed": 0}
    records = epoch_records(run)
    assert [r["trainer/epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["test/acc"] == metrics["test/acc"]
    best = max(records, key=lambda r: r["val/acc"])  # the first epoch of the highest
    assert records[-1]["test/acc_at_best_val"] == best["test/acc"]
    first = read_metrics(run)[0]
    assert first["step"] == 0 and first["noise/realized_rate"] == pytest.approx(
        trainer.data.noise.realized_rate
    )
    assert first["noise/realized_rate"] == pytest.approx(0.2, abs=0.04)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/acc_at_best_val"] == trainer.state.test_acc_at_best
    assert (run / "checkpoints" / "last.pt").is_file() and (
        run / "checkpoints" / "best.pt"
    ).is_file()
    assert (run / "curves.png").stat().st_size > 10_000 and (
        run / "noise_transition.png"
    ).stat().st_size > 10_000
    # train/clean_acc scores the student against the true labels of its noisy training set.
    assert records[-1]["train/clean_acc"] > records[-1]["train/acc"]


@pytest.mark.parametrize("into_epoch_2", [5, 20], ids=["mid-epoch", "at-the-epoch-end"])
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(
    make_config, into_epoch_2: int
) -> None:
    # Dropout draws from the global RNG, so this also checks that the RNG state is carried over.
    # Validation between epochs and a target accuracy leave the run as it is.
    common = ("train.epochs=3", "model.kwargs.dropout=0.2", "noise.type=pairflip", "noise.rate=0.3",
              "train.eval_every_steps=6", "train.target_val_acc=0.8")  # fmt: skip
    straight = Trainer(make_config(*common, "train.run_name=straight"))
    expected = straight.fit()

    first = Trainer(make_config(*common, "train.run_name=cut", "train.checkpoint_every_steps=7"))
    steps_per_epoch = len(first.train_loader)
    assert steps_per_epoch == 20  # 1,257 digits in batches of 64
    first.fit(max_steps=steps_per_epoch + into_epoch_2)
    assert first.state.epoch == 1 and first.state.batch == into_epoch_2

    resumed = Trainer(make_config(*common, f"train.resume={first.run_dir}"))
    assert resumed.run_dir == first.run_dir and resumed.state.step == steps_per_epoch + into_epoch_2
    final = resumed.fit()

    assert without_measurements(final) == without_measurements(expected)
    for a, b in zip(
        straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert [without_measurements(r) for r in epoch_records(first.run_dir)] == [
        without_measurements(r) for r in epoch_records(straight.run_dir)
    ]
    steps = [r["step"] for r in read_metrics(first.run_dir)]
    assert steps == sorted(steps)  # nothing logged twice
    assert resumed.state.evals == straight.state.evals
    assert resumed.state.target_step == straight.state.target_step is not None


def test_a_run_measures_when_it_reaches_the_target_and_can_stop_there(make_config) -> None:
    target = ("train.epochs=4", "train.eval_every_steps=3", "train.target_val_acc=0.8",
              "logging.plots=true")  # fmt: skip
    full = Trainer(make_config(*target, "train.run_name=full"))
    full.fit()
    state = full.state
    # Validation every 3 steps and at each epoch's end (20 steps an epoch), samples counted as learned.
    steps = [int(row[0]) for row in state.evals]
    assert steps[:8] == [3, 6, 9, 12, 15, 18, 20, 21] and steps[-1] == 80
    assert [int(row[1]) for row in state.evals] == sorted(int(row[1]) for row in state.evals)
    assert (
        state.learned == state.evals[-1][1] == 4 * len(full.data.train)
    )  # no teacher: every sample
    first = next(row for row in state.evals if row[2] >= 0.8)
    assert (state.target_step, state.target_samples) == (first[0], first[1])
    assert 3 <= state.target_step < 80  # the digits are learned to 80% within the run
    summary = json.loads((full.run_dir / "summary.json").read_text())
    assert summary["target/step"] == state.target_step
    assert (full.run_dir / "accuracy_vs_samples.png").stat().st_size > 10_000
    # Every evaluation is on the samples-learned axis: between epochs and at their ends.
    evals = [r for r in read_metrics(full.run_dir) if "eval/val_acc" in r]
    assert [r["step"] for r in evals] == steps
    assert [r["trainer/samples_learned"] for r in evals] == [int(row[1]) for row in state.evals]

    stopped = Trainer(make_config(*target, "train.stop_at_target=true", "train.run_name=stop"))
    last = stopped.fit()
    assert stopped.state.stopped and stopped.state.step == state.target_step
    assert stopped.state.evals == state.evals[: len(stopped.state.evals)]
    assert last["target/step"] == state.target_step and last["val/acc"] >= 0.8
    assert (
        stopped.state.history[-1]["trainer/epoch"] == state.target_step // 20 + 1
    )  # a partial last epoch


def test_samples_learned_from_are_those_the_lessons_keep(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=random_filter", "teacher.kwargs.keep=0.5"))
    trainer.fit()
    seen = 2 * len(trainer.data.train)
    assert 0.45 * seen < trainer.state.learned < 0.55 * seen
    assert trainer.state.history[-1]["trainer/samples_learned"] == trainer.state.learned


def test_resuming_with_a_different_experiment_is_refused(make_config) -> None:
    trainer = Trainer(make_config("train.epochs=1", "train.run_name=a"))
    trainer.fit()
    with pytest.raises(
        CheckpointError,
        match=r"belongs to a different experiment: model.kwargs.hidden was \[32\], the config now says \[64\]",
    ):
        Trainer(
            make_config(
                "train.epochs=2", "model.kwargs.hidden=[64]", f"train.resume={trainer.run_dir}"
            )
        )
    # More epochs is the same experiment, continued.
    # More epochs is the same experiment, continued; so is the data named by another path.
    longer = Trainer(
        make_config("train.epochs=2", "data.root=somewhere/else", f"train.resume={trainer.run_dir}")
    )
    assert longer.state.epoch == 1
    assert longer.fit()["trainer/epoch"] == 2


def test_bad_checkpoints_give_one_line_errors(make_config, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nowhere.pt"):
        Trainer(make_config(f"train.resume={tmp_path / 'nowhere.pt'}"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*corrupt.pt: ") as info:
        Trainer(make_config(f"train.resume={corrupt}"))
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="is not a metateach checkpoint"):
        Trainer(make_config(f"train.resume={foreign}"))


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoints" / "last.pt"

    def checkpoint(step: int) -> dict:
        progress = asdict(TrainState(step=step))
        return {"format": 1, "config": {}, "model": {"w": torch.ones(3)}, "progress": progress}

    save_checkpoint(path, checkpoint(1))

    def dies_half_way(obj: object, f: object) -> None:
        f.write(b"partial bytes")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(
        CheckpointError,
        match=r"cannot write checkpoint .*last.pt: disk full \(the previous one is intact\)",
    ):
        save_checkpoint(path, checkpoint(2))
    monkeypatch.undo()
    assert load_checkpoint(path)["progress"]["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_diverging_run_stops_at_the_step_and_saves_the_state_before_it(make_config) -> None:
    trainer = Trainer(make_config("optim.lr=1e12", "logging.every_steps=100"))
    with pytest.raises(MetateachError) as info:
        trainer.fit()
    message = str(info.value)
    step = trainer.state.step + 1  # the step that diverged was not taken
    assert re.fullmatch(
        rf"the training loss became non-finite at step {step} \(epoch 1, batch {step}\) and its "
        r"step was not taken; the state before it is saved in .*last.pt, and the checkpoint it was "
        r"rebuilt from \(step 0\) is kept as .*step0.pt; continue from a checkpoint with a lower "
        r"learning rate: .*",
        message,
    )
    saved = load_checkpoint(trainer.run_dir)
    assert saved["progress"]["step"] == step - 1 >= 1  # it diverged after some finite steps
    assert all(torch.isfinite(w).all() for w in saved["model"].values())
    assert {"step": step, "step/nonfinite": step} in read_metrics(trainer.run_dir)
    # The last good state resumes: the same step diverges again, nothing else is lost.
    again = Trainer(make_config("optim.lr=1e12", f"train.resume={trainer.run_dir}"))
    with pytest.raises(MetateachError, match=rf"non-finite at step {step} "):
        again.fit()


def test_an_existing_named_run_folder_is_not_overwritten(make_config) -> None:
    Trainer(make_config("train.epochs=1", "train.run_name=taken")).fit()
    with pytest.raises(
        ConfigError, match=r"run folder .*taken already exists; continue it with train.resume="
    ):
        Trainer(make_config("train.run_name=taken"))


def test_a_failing_wandb_warns_once_and_training_goes_on(
    make_config, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import wandb

    def broken_init(**kwargs: object) -> None:
        raise PermissionError("cannot write")

    monkeypatch.setattr(wandb, "init", broken_init)
    trainer = Trainer(make_config("train.epochs=2", "logging.wandb=offline"))
    metrics = trainer.fit()
    err = capsys.readouterr().err
    assert err.count("warning: W&B could not start (PermissionError: cannot write)") == 1
    assert metrics["trainer/epoch"] == 2 and len(epoch_records(trainer.run_dir)) == 2


@pytest.mark.parametrize(
    ("teacher", "average"),
    [
        ("focal", "ema"),
        ("deep_interaction", "mean"),
        ("focal", "mean"),
        ("deep_interaction", "ema"),
    ],
)
def test_the_teachers_average_training_loss_is_the_one_asked_for(
    make_config, teacher: str, average: str
) -> None:
    """M1's "average training loss until the current iteration": the mean since the start
    (the deep-interaction teacher's declaration) or an exponential average (the default)."""
    declared = (
        teacher == "deep_interaction"
        and average == "mean"
        or teacher == "focal"
        and average == "ema"
    )
    overrides = [f"teacher.name={teacher}", "train.epochs=1"]
    if teacher == "deep_interaction":
        overrides.append("teacher.hypergrad.inner_steps=2")
    if not declared:
        overrides.append(f"teacher.loss_average={average}")
    trainer = Trainer(make_config(*overrides))
    strategy = trainer.teaching.strategy
    seen: list[float] = []
    losses: list[float] = []
    step = strategy.step

    def spy(batch, context):
        seen.append(float(context.avg_train_loss))
        stats = step(batch, context)
        losses.append(float(stats[0]) / len(batch.y))
        return stats

    strategy.step = spy
    trainer.fit(max_steps=6)
    expected, running = [], 0.0
    for t, loss in enumerate(losses[:-1]):
        if average == "mean":
            running += (loss - running) / (t + 1)
        else:
            running = loss if t == 0 else 0.9 * running + 0.1 * loss
        expected.append(running)
    assert len(losses) == 6
    assert seen[1:] == pytest.approx(expected, rel=1e-6)


def test_a_bad_loss_average_is_a_config_error(make_config) -> None:
    with pytest.raises(ConfigError, match="teacher.loss_average .*mean or ema"):
        Trainer(make_config("teacher.name=focal", "teacher.loss_average=median"))
