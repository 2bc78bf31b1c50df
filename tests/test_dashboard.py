"""What a run shows in W&B: metrics on their axes, summaries, the teacher over time, the
diagnostic sample as a table, comparisons grouped, and sweeps the agent can run.

Each run is read back from its offline file (``tests/wandb_records.py``), as
``wandb sync`` would upload it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from metateach.config import config_to_dict, flatten, load_config
from metateach.lab.compare_cli import main
from metateach.logging import read_metrics
from metateach.progress import TrainState
from metateach.report.dashboard import TABLE_COLUMNS
from metateach.trainer import Trainer

from .conftest import CONFIGS, QUICK, REPO, write_yaml
from .wandb_records import read_offline_run

#: The namespaces every metric is under (``metateach.logging``).
NAMESPACES = {"train", "val", "test", "teacher", "lesson", "noise", "eval", "episode", "perf",
              "trainer", "step", "peer", "target", "loss_curve"}  # fmt: skip


def test_the_offline_wandb_run_holds_the_axes_summaries_histograms_and_sample_table(
    make_config,
) -> None:
    trainer = Trainer(
        make_config(
            "train.epochs=3", "logging.wandb=offline", "noise.type=symmetric", "noise.rate=0.3",
            "teacher.name=learning_to_reweight", "logging.every_steps=5",
            "logging.table_epochs=[1,-1]", "logging.diagnostic_samples=300",
        )
    )  # fmt: skip
    trainer.fit()
    (folder,) = (trainer.run_dir / "wandb").glob("offline-run-*")
    assert trainer.logger.wandb_dir == str(folder)
    run = read_offline_run(folder, wait_for="trainer/best_epoch")
    # The resolved config, flattened as overrides name it; the data's sizes beside it.
    assert run.config["noise.type"] == "symmetric" and run.config["teacher.name"] == (
        "learning_to_reweight"
    )
    assert run.config["data/train_size"] == len(trainer.data.train)
    # Each metric on its own axis: epochs, steps, samples learned from.
    axes = {name: metric.step_metric for name, metric in run.metrics.items()}
    assert (
        axes["val/acc"]
        == axes["train/loss"]
        == axes["teacher/mean_weight_noisy"]
        == ("trainer/epoch")
    )
    assert axes["eval/val_acc"] == "trainer/samples_learned"
    assert axes["step/train_loss"] == axes["step/teacher/update_seconds"] == "trainer/step"
    assert axes["teacher/weights_clean"] == "trainer/epoch"
    assert all(name.split("/")[0] in NAMESPACES for name in run.metrics), sorted(run.metrics)
    epochs = run.rows_with("trainer/epoch")
    assert [row["trainer/epoch"] for row in epochs] == [1, 2, 3]
    assert [row["trainer/samples_learned"] for row in epochs] == [
        e * len(trainer.data.train) for e in (1, 2, 3)
    ]
    assert len(run.rows_with("step/train_loss")) >= 3
    # Summaries that mean something: the best validation accuracy, the last test accuracy.
    val = [row["val/acc"] for row in epochs]
    assert run.summary["val/acc"] == {"max": max(val)}
    assert run.summary["test/acc"] == epochs[-1]["test/acc"]
    best = epochs[val.index(max(val))]
    assert run.summary["test/acc_at_best_val"] == best["test/acc"]
    # The teacher's weights every epoch, clean and mislabeled apart.
    for name in ("teacher/weights_clean", "teacher/weights_mislabeled"):
        assert [row[f"{name}/_type"] for row in run.rows_with(f"{name}/_type")] == ["histogram"] * 3
    # The diagnostic sample as a table at epochs 1 and 3, sortable by weight.
    assert [row["trainer/epoch"] for row in run.rows_with("teacher/samples/path")] == [1, 3]
    table, files = run.table("teacher/samples")
    assert table["columns"] == [*TABLE_COLUMNS, "image"]
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert len(rows) == 300
    snapshot = trainer.diagnostics.snapshot
    indices = trainer.diagnostics.indices.tolist()
    weight_of = dict(zip(indices, snapshot.weights.tolist(), strict=True))
    assert sorted(r["index"] for r in rows) == indices
    assert [r["weight"] for r in rows] == pytest.approx([weight_of[r["index"]] for r in rows])
    assert [r["weight"] for r in rows] == sorted(r["weight"] for r in rows)  # the least first
    classes = trainer.data.info.classes
    for r in rows:
        given, true = (
            trainer.data.train.targets[r["index"]],
            trainer.data.train.clean_targets[r["index"]],
        )
        assert (r["given_label"], r["true_label"]) == (classes[given], classes[true])
        assert r["mislabeled"] == (given != true)
        assert r["image"]["_type"] == "image-file" and files[r["image"]["path"]].is_file()
    for r in rows[:5] + rows[-5:]:  # each row's thumbnail is its own sample's image
        pixels = np.asarray(Image.open(files[r["image"]["path"]]))
        assert (pixels == trainer.data.train.images[r["index"], 0].numpy()).all()
    assert {r["mislabeled"] for r in rows} == {True, False}


def test_the_teacher_logs_its_hypergradients_turn_and_its_learning_rate(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=meta_weight_net", "train.epochs=2"))
    stepped: list[torch.Tensor] = []
    problem = trainer.teaching.strategy.problem
    step = problem.teacher_step

    def spy(grads):
        stepped.append(torch.cat([g.detach().double().flatten() for g in grads]))
        return step(grads)

    problem.teacher_step = spy
    trainer.fit()
    epochs = [r for r in read_metrics(trainer.run_dir) if "trainer/epoch" in r]
    # Each teacher step's cosine with the one before, by hand; an epoch record holds its mean.
    cosines = [
        float(a @ b / (a.norm() * b.norm())) for a, b in zip(stepped[1:], stepped[:-1], strict=True)
    ]
    per_epoch = len(stepped) // 2
    assert len(stepped) == 2 * per_epoch > 2
    assert epochs[0]["teacher/hypergrad_cosine"] == pytest.approx(np.mean(cosines[: per_epoch - 1]))
    assert epochs[1]["teacher/hypergrad_cosine"] == pytest.approx(np.mean(cosines[per_epoch - 1 :]))
    norms = [float(g.norm()) for g in stepped]
    assert epochs[1]["teacher/hypergrad_norm"] == pytest.approx(np.mean(norms[per_epoch:]))
    assert [r["teacher/lr"] for r in epochs] == [trainer.cfg.teacher.optim.lr] * 2


def test_a_masking_teacher_logs_its_keep_rate_by_loss_decile(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=random_filter", "teacher.kwargs.keep=0.5"))
    trainer.fit()
    last = [r for r in read_metrics(trainer.run_dir) if "trainer/epoch" in r][-1]
    snapshot = trainer.diagnostics.snapshot
    order = np.argsort(snapshot.losses, kind="stable")
    for i, part in enumerate(np.array_split(order, 10)):
        assert last[f"lesson/keep_rate_loss_decile_{i + 1:02d}"] == snapshot.kept[part].mean()
    assert (
        0.3 < np.mean([last[f"lesson/keep_rate_loss_decile_{i:02d}"] for i in range(1, 11)]) < 0.7
    )
    # A teacher that only weighs has no mask and no such metric.
    weigher = Trainer(make_config("teacher.name=focal"))
    weigher.fit()
    assert not any(
        k.startswith("lesson/keep_rate") for r in read_metrics(weigher.run_dir) for k in r
    )


def test_a_learned_loss_is_drawn_as_a_line_series_of_its_epochs(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=label_smoothing", "logging.wandb=offline"))
    trainer.fit()
    (folder,) = (trainer.run_dir / "wandb").glob("offline-run-*")
    run = read_offline_run(folder, wait_for="trainer/best_epoch")
    table, _ = run.table("teacher/loss_curves_table")
    epochs = [r for r in read_metrics(trainer.run_dir) if "trainer/epoch" in r]
    lines = {}
    for row in (dict(zip(table["columns"], r, strict=True)) for r in table["data"]):
        lines.setdefault(row["lineKey"], []).append((row["step"], row["lineVal"]))
    assert list(lines) == ["epoch 1", "epoch 2"]
    for record, (name, points) in zip(epochs, lines.items(), strict=True):
        xs, ys = zip(*points, strict=True)
        keys = [k for k in record if k.startswith("loss_curve/")]
        assert len(xs) == len(keys) == 14, name
        assert list(ys) == pytest.approx([record[k] for k in keys])


@pytest.mark.slow  # a whole comparison / two networks: run by .ci/run
def test_a_comparisons_runs_are_one_group_and_its_table_a_run_of_its_own(tmp_path: Path) -> None:
    spec = write_yaml(tmp_path / "tiny.yaml", {
        "config": str(CONFIGS / "quickstart.yaml"), "seeds": [0],
        "variants": {"none": ["teacher.name=none"], "focal": ["teacher.name=focal"]},
        "paper": {"focal": 91.5},
    })  # fmt: skip
    quick = [o for o in QUICK if not o.startswith("logging.wandb")]
    assert main([str(spec), *quick, "logging.wandb=offline", "--out", str(tmp_path / "runs")]) == 0
    folder = tmp_path / "runs" / "tiny"
    for variant in ("none", "focal"):
        (offline,) = (folder / f"{variant}-seed0" / "wandb").glob("offline-run-*")
        run = read_offline_run(offline)
        assert (run.group, run.job_type) == ("tiny", variant)
        assert "seed0" in run.tags and "quickstart" in run.tags
        assert run.config["logging.paper"] == {"none": None, "focal": 91.5}[variant]
    (offline,) = (folder / "wandb").glob("offline-run-*")
    summary = read_offline_run(offline)
    assert (summary.group, summary.job_type) == ("tiny", "summary")
    assert summary.config["paper/focal"] == 91.5
    table, _ = summary.table("comparison/table")
    results = json.loads((folder / "results.json").read_text())["summary"]
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["data"]}
    assert list(rows) == ["none", "focal"]
    for result in results:
        row = rows[result["variant"]]
        assert row["runs"] == 1 and row["test/acc"] == pytest.approx(result["test/acc"])
    assert rows["focal"]["paper"] == 91.5 and rows["none"]["paper"] is None
    chart = summary.config["_wandb/visualize/comparison/test_acc"]  # the bar chart's panel
    assert chart["panel_config"]["panelDefId"] == "wandb/bar/v0"


def agent_command(sweep: dict, values: dict) -> list[str]:
    """A sweep's command line for one choice of its parameters, expanded as W&B's agent
    expands it (``${env}``, ``${interpreter}``, ``${program}``, ``${args_no_hyphens}``)."""
    macros = {"${env}": ["/usr/bin/env"], "${interpreter}": ["python"], "${program}": [sweep["program"]],
              "${args_no_hyphens}": [f"{key}={value}" for key, value in values.items()]}  # fmt: skip
    return [part for item in sweep["command"] for part in macros.get(item, [item])]


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_sweep_command_line_is_accepted_by_the_config_loader(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert (REPO / sweep["program"]).is_file() and sweep["method"] in ("grid", "random", "bayes")
    state = TrainState(history=[{"test/acc": 0.9, "val/acc": 0.9}])
    assert sweep["metric"]["name"] in state.summary(0.0, has_target=False)  # a number it reports
    names = list(sweep["parameters"])
    for choice in itertools.product(*(sweep["parameters"][n]["values"] for n in names)):
        values = dict(zip(names, choice, strict=True))
        command = agent_command(sweep, values)
        program = command.index(sweep["program"])
        assert command[:program] == ["/usr/bin/env", "python"]
        config, *overrides = command[program + 1 :]
        cfg = load_config(REPO / config, overrides)
        flat = flatten(config_to_dict(cfg))
        assert {name: flat[name] for name in names} == values


def test_checkpoints_go_to_wandb_as_model_artifacts_only_when_asked(make_config) -> None:
    trainer = Trainer(make_config("logging.wandb=offline", "logging.checkpoint_artifacts=true"))
    trainer.fit()
    (folder,) = (trainer.run_dir / "wandb").glob("offline-run-*")
    models = [a for a in read_offline_run(folder, wait_for="trainer/best_epoch").artifacts
              if a.type == "model"]  # fmt: skip
    assert {a.name for a in models} == {f"checkpoint-{folder.name.rsplit('-', 1)[1]}"}
    assert {alias for a in models for alias in a.aliases} >= {"last", "best"}
    epochs = [r for r in read_metrics(trainer.run_dir) if "trainer/epoch" in r]
    last = models[-1]
    assert last.metadata["epoch"] == 2 and last.metadata["val/acc"] == epochs[-1]["val/acc"]
    assert last.metadata["config"]["train.epochs"] == 2
    (staged,) = last.files.values()
    assert staged.read_bytes() == (trainer.run_dir / "checkpoints" / "last.pt").read_bytes()
    plain = Trainer(make_config("logging.wandb=offline"))
    plain.fit()
    (folder,) = (plain.run_dir / "wandb").glob("offline-run-*")
    run = read_offline_run(folder, wait_for="trainer/best_epoch")
    assert not [a for a in run.artifacts if a.type == "model"]


@pytest.mark.slow  # a whole comparison / two networks: run by .ci/run
def test_co_teaching_shows_both_selections_and_their_agreement(make_config) -> None:
    trainer = Trainer(make_config("teacher.name=co_teaching", "noise.type=symmetric",
                                  "noise.rate=0.3", "logging.wandb=offline",
                                  "logging.table_images=false"))  # fmt: skip
    trainer.fit()
    (folder,) = (trainer.run_dir / "wandb").glob("offline-run-*")
    table, _ = read_offline_run(folder, wait_for="trainer/best_epoch").table("teacher/samples")
    assert table["columns"] == [*TABLE_COLUMNS, "peer_kept", "agree"]
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert all(r["agree"] == (r["kept"] == r["peer_kept"]) for r in rows)
    last = [r for r in read_metrics(trainer.run_dir) if "trainer/epoch" in r][-1]
    assert last["peer/selection_agreement"] == pytest.approx(np.mean([r["agree"] for r in rows]))
    both = np.mean([r["kept"] and r["peer_kept"] for r in rows])
    assert last["peer/selected_by_both"] == pytest.approx(both)
    assert 0 < both < last["peer/selection_agreement"] <= 1  # the networks drop some samples
