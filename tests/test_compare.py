"""Comparisons over seeds: run, resume, tabulate."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from metateach import train
from metateach.config import load_config
from metateach.errors import CheckpointError, ConfigError
from metateach.lab.compare import Comparison, load_comparison, run_comparison
from metateach.lab.compare_cli import main
from metateach.lab.results import (
    accuracy_curve,
    course,
    markdown_table,
    selected,
    summarize,
    write_results,
)
from metateach.logging import read_summary
from metateach.progress import TrainState
from metateach.report.diagnostics import SNAPSHOT, WeightSnapshot

from .conftest import CONFIGS, QUICK, layered, write_yaml


def test_a_comparison_runs_each_variant_and_seed_once_and_tabulates(tmp_path: Path) -> None:
    spec = write_yaml(tmp_path / "cmp.yaml", {
        "config": str(CONFIGS / "quickstart.yaml"),
        "seeds": [0, 1],
        "variants": {"plain": ["teacher.name=none"], "mwn": ["teacher.name=meta_weight_net"]},
    })  # fmt: skip
    comparison = load_comparison(spec)
    calls = []

    def counting(cfg):
        calls.append((cfg.teacher.name, cfg.train.seed))
        return train(cfg)

    results = run_comparison(comparison, tmp_path / "out", QUICK, train=counting)
    # Seed by seed, so that a comparison cut short has every variant's first seed.
    assert calls == [("none", 0), ("meta_weight_net", 0), ("none", 1), ("meta_weight_net", 1)]
    assert [(r["variant"], r["seed"]) for r in results] == [
        ("plain", 0),
        ("plain", 1),
        ("mwn", 0),
        ("mwn", 1),
    ]
    again = run_comparison(comparison, tmp_path / "out", QUICK, train=counting)
    assert len(calls) == 4 and again == results  # finished runs are read back, not retrained
    changed = Comparison(
        comparison.config, [0], {"plain": ["teacher.name=none", "optim.lr=0.01"]}, "cmp"
    )
    with pytest.raises(
        CheckpointError,
        match=r"plain-seed0/config.yaml belongs to a different experiment: optim.lr",
    ):
        run_comparison(changed, tmp_path / "out", QUICK, train=counting)
    rows = summarize(results)
    plain = rows[0]
    accs = [100 * r["test/acc"] for r in results[:2]]
    assert plain["runs"] == 2 and plain["test/acc"] == pytest.approx(sum(accs) / 2)
    table = markdown_table(rows)
    assert table.splitlines()[2].startswith("| plain | 2 | ") and "±" in table


def test_the_command_line_writes_the_results(tmp_path: Path, capsys) -> None:
    spec = write_yaml(tmp_path / "tiny.yaml", {
        "config": str(CONFIGS / "quickstart.yaml"), "seeds": [0], "variants": {"a": [], "b": ["optim.lr=0.01"]},
    })  # fmt: skip
    assert main([str(spec), *QUICK, "--out", str(tmp_path / "runs"), "--jobs", "2"]) == 0
    assert "| a | 1 |" in capsys.readouterr().out
    for run in ("a-seed0", "b-seed0"):  # trained in two processes, one thread each
        saved = yaml.safe_load((tmp_path / "runs" / "tiny" / run / "config.yaml").read_text())
        assert saved["train"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    for name in ("results.md", "results.json", "results.png"):
        assert (tmp_path / "runs" / "tiny" / name).is_file()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"config": "x.yaml", "variants": {}, "seed": [1]},
            "unknown key 'seed'; valid: config, figure2, overrides, paper, seeds, select, table, variants",
        ),
        ({"variants": {}}, "missing key 'config'"),
        (
            {"config": "x.yaml", "variants": {"a": "teacher.name=none"}},
            "variants must map names to lists",
        ),
        (
            {"config": "x.yaml", "variants": {}, "seeds": [0.5]},
            "seeds must be a non-empty list of integers, got [0.5]",
        ),
        (
            {"config": "x.yaml", "variants": {"a": []}, "seeds": []},
            "seeds must be a non-empty list of integers, got []",
        ),
        (
            {"config": "x.yaml", "variants": {"a": []}, "seeds": [1, 1]},
            "seeds [1, 1] repeat a seed",
        ),
        (
            {"config": "x.yaml", "variants": {"a": ["optim.lr=0.1", "optim.lr=0.2"]}},
            "variant 'a': optim.lr is given two values (0.1, then 0.2); give it once",
        ),
        (
            {"variants": {"a": {"config": "a.yaml"}, "b": ["optim.lr=0.1"]}},
            "missing key 'config' (variant 'b' names none of its own)",
        ),
        ({"variants": {"a": {"overrides": []}}}, "variant 'a': missing key 'config'"),
        (
            {"variants": {"a": {"config": "a.yaml", "seed": 1}}},
            "variant 'a': unknown key 'seed'; valid: config, overrides",
        ),
        (
            {"config": "x.yaml", "variants": {"a_x": []}, "table": {"pair": {"A": "a_"}}},
            "table: pair must map two column titles to variant prefixes",
        ),
        (
            {
                "config": "x.yaml",
                "variants": {"a_x": []},
                "table": {"pair": {"A": "c_", "B": "d_"}},
            },
            "table: no variant is named <prefix><setting> for the prefixes c_, d_",
        ),
        (
            {
                "config": "x.yaml",
                "variants": {"a_x": []},
                "table": {"pair": {"A": "a_", "B": "b_"}, "rows": {"z": "zed"}},
            },
            "table: rows: no variant for setting 'z' (settings: x)",
        ),
        (
            {"config": "x.yaml", "variants": {"a_x": []}, "table": {"pairs": {}}},
            "table: unknown key 'pairs'; valid: last_epoch, pair, row_title, rows",
        ),
        (
            {"config": "x.yaml", "variants": {"a": []}, "figure2": {"T0": "b"}},
            "figure2 must map row titles to variant names (variants: a)",
        ),
        (
            {"config": "x.yaml", "variants": {"a": []}, "select": {"best": ["a", "b"]}},
            "select must map new row names to lists of variants (variants: a)",
        ),
        (  # a comparison file someone hands you cannot write outside its --out
            {"config": "x.yaml", "variants": {"../../../escape": []}},
            "variant='../../../escape' must be a single folder name (no '/', no '..')",
        ),
        (
            {"config": "x.yaml", "variants": {"/tmp/elsewhere": []}},
            "variant='/tmp/elsewhere' must be a single folder name",
        ),
    ],
)
def test_bad_comparison_files_are_named(tmp_path: Path, content: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_comparison(write_yaml(tmp_path / "bad.yaml", content))


def test_two_methods_are_tabulated_side_by_side_per_setting(tmp_path: Path) -> None:
    spec = write_yaml(tmp_path / "pair.yaml", {
        "config": str(CONFIGS / "quickstart.yaml"),
        "seeds": [0, 1],
        "variants": {"a_x": [], "b_x": [], "a_y": [], "b_y": []},
        "paper": {"b_x": 99.0},
        "table": {"pair": {"A": "a_", "B": "b_"}, "row_title": "noise",
                  "rows": {"y": "why", "x": "ex"}, "last_epoch": {"prec (%)": "p"}},
    })  # fmt: skip
    comparison = load_comparison(spec)
    accuracies = {"a_x": [0.5, 0.7], "b_x": [0.8, 0.9], "a_y": [0.1, 0.3], "b_y": [0.2, 0.2]}
    results = []
    for variant, accs in accuracies.items():
        for seed, acc in enumerate(accs):
            folder = tmp_path / f"{variant}-seed{seed}"
            folder.mkdir()
            # The last epoch's p, not an earlier epoch's nor a later step record's.
            records = [
                {"trainer/epoch": 1, "p": 0.5},
                {"trainer/epoch": 2, "p": acc},
                {"step": 9, "p": 0.0},
            ]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            results.append({"variant": variant, "seed": seed, "folder": str(folder),
                            "test/acc": acc, "test/acc_at_best_val": acc})  # fmt: skip
    table = write_results(comparison, tmp_path, results)
    lines = table.splitlines()
    assert lines[:4] == [
        "| noise | A | B | B − A | paper: A | paper: B | prec (%), A / B | seeds |",
        "|---|---|---|---|---|---|---|---|",
        "| why | 20.00 ± 14.14 | 20.00 ± 0.00 | +0.00 | – | – | 20.0 / 20.0 | 2 |",
        "| ex | 60.00 ± 14.14 | 85.00 ± 7.07 | +25.00 | – | 99.00 | 60.0 / 85.0 | 2 |",
    ]
    assert len(lines) == 4
    # results.md has the usual table by variant below it.
    document = (tmp_path / "results.md").read_text()
    assert document.startswith(table + "\n\nBy variant:\n")
    assert "| b_x | 2 | 85.00 ± 7.07 | 85.00 ± 7.07 | 99.00 |" in document


def test_every_shipped_comparison_loads() -> None:
    files = sorted((CONFIGS / "compare").glob("**/*.yaml"))
    assert files
    for path in files:
        comparison = load_comparison(path)
        for variant, overrides in comparison.variants.items():
            load_config(comparison.config_of(variant), [*comparison.overrides, *overrides])


def test_teaching_speed_is_tabulated_over_the_runs_that_reached_the_target() -> None:
    run = {"test/acc": 0.9, "test/acc_at_best_val": 0.9}
    results = [
        {"variant": "l2t", "seed": 0, **run, "target/step": 10, "target/samples_learned": 600,
         "target/samples_examined": 1200},
        {"variant": "l2t", "seed": 1, **run, "target/step": 20, "target/samples_learned": 1000,
         "target/samples_examined": 3000},
        {"variant": "l2t", "seed": 2, **run, "target/step": None, "target/samples_learned": None,
         "target/samples_examined": None},
        {"variant": "none", "seed": 0, **run, "target/step": None, "target/samples_learned": None,
         "target/samples_examined": None},
    ]  # fmt: skip
    l2t, none = summarize(results)
    assert l2t["reached"] == 2 and l2t["target/samples_learned"] == 800
    assert l2t["target/samples_learned std"] == pytest.approx(282.84, abs=0.01)
    assert none["reached"] == 0
    lines = markdown_table([l2t, none]).splitlines()
    assert (
        "| reached the target | steps to the target | samples to the target "
        "| samples examined to the target |" in lines[0]
    )
    assert lines[2].endswith("| 2/3 | 15 ± 7 | 800 ± 283 | 2,100 ± 1,273 |")
    assert lines[3].endswith("| 0/1 | – | – | – |")
    assert "reached" not in markdown_table(summarize([{"variant": "a", "seed": 0, **run}]))
    # A run recorded before samples examined were counted leaves that cell empty.
    (old,) = summarize(
        [{"variant": "old", "seed": 0, **run, "target/step": 5, "target/samples_learned": 300}]
    )
    assert markdown_table([old]).splitlines()[2].endswith("| 1/1 | 5 ± 0 | 300 ± 0 | – |")


def test_a_speed_comparison_draws_every_runs_accuracy_curve(tmp_path: Path) -> None:
    spec = write_yaml(tmp_path / "speed.yaml", {
        "config": str(CONFIGS / "quickstart.yaml"), "seeds": [0],
        "overrides": ["train.target_val_acc=0.3", "train.eval_every_steps=2"],
        "variants": {"none": ["teacher.name=none"],
                     "rand": ["teacher.name=random_filter", "teacher.refill=true"]},
    })  # fmt: skip
    assert (
        main([str(spec), *layered(QUICK, ["train.epochs=12"]), "--out", str(tmp_path / "runs")])
        == 0
    )
    folder = tmp_path / "runs" / "speed"
    assert "| 1/1 |" in (folder / "results.md").read_text()
    assert (folder / "results_speed.png").stat().st_size > 10_000
    curve = accuracy_curve(folder / "none-seed0")
    assert len(curve) > 2 and [s for s, _ in curve] == sorted(s for s, _ in curve)


def test_variants_may_run_experiments_of_their_own(tmp_path: Path) -> None:
    spec = write_yaml(tmp_path / "paper.yaml", {
        "seeds": [0],
        "variants": {
            "plain": {"config": str(CONFIGS / "quickstart.yaml"), "overrides": ["teacher.name=none"]},
            "taught": {"config": str(CONFIGS / "quickstart.yaml")},
        },
        "paper": {"taught": 97.0},
    })  # fmt: skip
    comparison = load_comparison(spec)
    assert comparison.config is None and comparison.paper == {"taught": 97.0}
    seen = []

    def recording(cfg):
        seen.append(cfg.teacher.name)
        return train(cfg)

    results = run_comparison(comparison, tmp_path / "out", QUICK, train=recording)
    assert seen == ["none", "learning_to_reweight"]
    assert [r["variant"] for r in results] == ["plain", "taught"]


def test_figure2_draws_each_named_teacher_from_its_first_run(tmp_path: Path) -> None:
    spec = write_yaml(tmp_path / "fig.yaml", {
        "config": str(CONFIGS / "quickstart.yaml"),
        "seeds": [0],
        "overrides": ["teacher.name=deep_interaction", "teacher.hypergrad.inner_steps=2"],
        "variants": {"surface": ["teacher.kwargs.features=[M1]"],
                     "internal": ["teacher.kwargs.features=[I0,M0]"]},
        "figure2": {"T0": "surface", "T1": "internal"},
    })  # fmt: skip
    comparison = load_comparison(spec)
    assert comparison.figure2 == {"T0": "surface", "T1": "internal"}
    drawn = [o for o in QUICK if o != "logging.plots=false"]
    results = run_comparison(comparison, tmp_path / "out", drawn)
    for result in results:
        snapshot = WeightSnapshot.load(Path(result["folder"]) / "diagnostics" / SNAPSHOT)
        assert len(snapshot.weights) == 200 and snapshot.features.shape[0] == 200
    write_results(comparison, tmp_path / "out", results)
    assert (tmp_path / "out" / "figure2.png").stat().st_size > 10_000


def test_the_course_figure_follows_each_teacher_epoch_by_epoch(tmp_path: Path) -> None:
    comparison = Comparison(config=None, seeds=[0], variants={"none": [], "taught": []})
    taught = [
        {"step": 50, "step/teacher/hypergrad_norm": 1.0},
        {"step": 100, "step/teacher/hypergrad_norm": 3.0},
        {"step": 120, "trainer/epoch": 1, "test/acc": 0.9, "teacher/noisy_weight_share": 0.3,
         "teacher/hypergrad_norm": 2.0},
        {"step": 150, "step/teacher/hypergrad_norm": 0.5},
        {"step": 240, "trainer/epoch": 2, "test/acc": 0.8, "teacher/noisy_weight_share": 0.1,
         "teacher/hypergrad_norm": 0.5},
    ]  # fmt: skip
    untaught = [
        {"step": 120, "trainer/epoch": 1, "test/acc": 0.7},
        {"step": 240, "trainer/epoch": 2, "test/acc": 0.6},
    ]
    results = []
    for variant, records in {"none": untaught, "taught": taught}.items():
        folder = tmp_path / f"{variant}-seed0"
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        results.append({"variant": variant, "seed": 0, "folder": str(folder), "test/acc": 0.5,
                        "test/acc_at_best_val": 0.5, "noise/realized_rate": 0.4})  # fmt: skip
    # Each epoch record's value (a metric recorded every step: its epoch's mean); step records aside.
    assert course(tmp_path / "taught-seed0") == {
        "teacher/hypergrad_norm": [(1, 2.0), (2, 0.5)],
        "test/acc": [(1, 0.9), (2, 0.8)],
        "teacher/noisy_weight_share": [(1, 0.3), (2, 0.1)],
    }
    assert course(tmp_path / "none-seed0") == {"test/acc": [(1, 0.7), (2, 0.6)]}
    write_results(comparison, tmp_path, results)
    assert (tmp_path / "results_course.png").stat().st_size > 10_000
    # Without a teacher's course there is nothing beyond the accuracy table to draw.
    write_results(comparison, tmp_path / "none-seed0", results[:1])
    assert not (tmp_path / "none-seed0" / "results_course.png").exists()


def test_a_setting_chosen_on_validation_is_a_row_of_its_own() -> None:
    def run(variant: str, seed: int, val: float, test: float) -> dict:
        return {"variant": variant, "seed": seed, "val/best_acc": val, "test/acc": test,
                "test/acc_at_best_val": test}  # fmt: skip

    results = [run("g1", 0, 0.90, 0.80), run("g2", 0, 0.95, 0.70),
               run("g1", 1, 0.97, 0.85), run("g2", 1, 0.93, 0.99), run("g1", 2, 0.99, 0.5)]  # fmt: skip
    chosen = selected(results, {"focal": ["g1", "g2"]})
    # Seed 2 lacks g2's run: no choice is made among part of the candidates.
    assert [(r["seed"], r["chosen"], r["test/acc"]) for r in chosen] == [
        (0, "g2", 0.70),
        (1, "g1", 0.85),
    ]
    row = summarize(chosen)[0]
    assert row["variant"] == "focal" and row["test/acc"] == pytest.approx(77.5)


def test_runs_written_under_the_old_metric_names_are_read_under_todays(tmp_path: Path) -> None:
    folder = tmp_path / "old-seed0"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({
        "test/acc": 0.9, "val/acc": 0.8, "best/val_acc": 0.85, "best/epoch": 1, "best/test_acc": 0.88,
        "steps": 40, "learned_samples": 800, "examined_samples": 900, "episodes": 1,
    }))  # fmt: skip
    records = [
        {"step": 20, "epoch": 1, "test/acc": 0.88, "val/acc": 0.85, "lr": 0.1,
         "train/learned_samples": 400, "teacher/hypergrad_norm": 2.0},
        {"step": 30, "eval/val_acc": 0.8, "eval/learned_samples": 600},
        {"step": 40, "epoch": 2, "test/acc": 0.9, "val/acc": 0.8, "train/learned_samples": 800},
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = read_summary(folder)
    assert summary["test/acc_at_best_val"] == 0.88 and summary["val/best_acc"] == 0.85
    assert summary["trainer/samples_learned"] == 800 and "best/test_acc" not in summary
    assert course(folder) == {
        "test/acc": [(1, 0.88), (2, 0.9)],
        "teacher/hypergrad_norm": [(1, 2.0)],
    }
    assert accuracy_curve(folder) == [(600, 0.8)]
    rows = summarize([{"variant": "old", "seed": 0, **summary}])
    assert rows[0]["test/acc_at_best_val"] == pytest.approx(88.0)
    # A checkpoint's records of an older run come back under today's names too.
    state = TrainState.from_dict({**asdict(TrainState()), "history": records[:1], "episodes": []})
    assert state.history[0]["trainer/epoch"] == 1 and state.history[0]["train/lr"] == 0.1
