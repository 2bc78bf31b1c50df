"""Comparisons over seeds: run, resume, tabulate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from metateach.compare import Comparison, load_comparison, markdown_table, run_comparison, summarize
from metateach.compare_cli import main
from metateach.config import load_config
from metateach.errors import CheckpointError, ConfigError
from metateach.trainer import train

from .conftest import CONFIGS

QUICK = ["train.epochs=1", "data.train_subset=200", "logging.wandb=disabled", "logging.plots=false",
         "model.kwargs.hidden=[16]"]  # fmt: skip


def write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_a_comparison_runs_each_variant_and_seed_once_and_tabulates(tmp_path: Path) -> None:
    spec = write(tmp_path / "cmp.yaml", {
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
    spec = write(tmp_path / "tiny.yaml", {
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
            "unknown key 'seed'; valid: config, overrides, paper, seeds, variants",
        ),
        ({"variants": {}}, "missing key 'config'"),
        (
            {"config": "x.yaml", "variants": {"a": "teacher.name=none"}},
            "variants must map names to lists",
        ),
        ({"config": "x.yaml", "variants": {}, "seeds": [0.5]}, "seeds must be a list of integers"),
    ],
)
def test_bad_comparison_files_are_named(tmp_path: Path, content: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_comparison(write(tmp_path / "bad.yaml", content))


def test_every_shipped_comparison_loads() -> None:
    files = sorted((CONFIGS / "compare").glob("*.yaml"))
    assert files
    for path in files:
        comparison = load_comparison(path)
        for overrides in comparison.variants.values():
            load_config(comparison.config, [*comparison.overrides, *overrides])
