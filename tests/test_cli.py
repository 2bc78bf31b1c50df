"""``tools/train.py``: the quickstart end to end, and one-line errors with exit status 2."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metateach.cli import main as cli_main
from metateach.cli import train_main as main

from .conftest import CONFIGS, REPO

QUIET = ["train.progress=false", "logging.wandb=disabled"]


def run_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # WANDB_SERVICE points at this process's own W&B service once an earlier
    # test used W&B in-process; a child must start its own.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_quickstart_prints_a_test_accuracy_and_writes_an_offline_wandb_run(tmp_path: Path) -> None:
    # README command (a), exactly as shipped, from a fresh working directory.
    done = run_tool(str(CONFIGS / "quickstart.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    match = re.search(r"test accuracy: (\d+\.\d+)% after 30 epochs", done.stdout)
    assert match, done.stdout
    assert float(match.group(1)) > 85.0  # digits with 20% noisy labels; chance is 10%
    runs = list((tmp_path / "runs").glob("quickstart-*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert f"wandb sync {runs[0].parent.relative_to(tmp_path)}" in done.stdout


def test_errors_leave_no_traceback_and_exit_2(tmp_path: Path) -> None:
    done = run_tool(str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.yaml'}"
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.epochz=3"],
            "error: overrides: unknown key 'train.epochz'; valid keys in 'train': epochs,",
        ),
        (
            ["train.batch_size=big"],
            "error: overrides: wrong type for train.batch_size: Value 'big' of type 'str' could not be converted to Integer",
        ),
        (
            ["data.name=cifar11"],
            "error: unknown dataset 'cifar11' (data.name); available: cifar10, cifar100,",
        ),
        (
            ["model.name=vgg16"],
            "error: unknown model 'vgg16' (model.name); available: cifar_resnet, cnn9, lenet, mlp,",
        ),
        (
            ["noise.type=asymmetric"],
            "error: unknown noise 'asymmetric' (noise.type); available: flip2, instance,",
        ),
        (
            ["data.name=mnist", "data.root=/nonexistent"],
            "error: MNIST not found under data root '/nonexistent'",
        ),
        (
            ["train.resume=/nonexistent/last.pt"],
            "error: checkpoint not found: /nonexistent/last.pt",
        ),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(
    overrides: list[str], message: str, capsys, tmp_path: Path
) -> None:
    code = main([str(CONFIGS / "quickstart.yaml"), *QUIET, f"train.out_dir={tmp_path}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message), err
    assert err.count("\n") == 1


def test_a_bad_config_file_is_named(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: config file {bad}: unknown key 'optim.learning_rate'"
    )


def test_overrides_reach_the_run(tmp_path: Path, capsys) -> None:
    code = main(
        [
            str(CONFIGS / "quickstart.yaml"),
            *QUIET,
            f"train.out_dir={tmp_path}",
            "train.epochs=2",
            "train.run_name=short",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "after 2 epochs" in out
    assert "epochs: 2" in (tmp_path / "short" / "config.yaml").read_text()


def test_the_metateach_command_lists_its_subcommands_and_runs_them(tmp_path: Path, capsys) -> None:
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [s.value for s in scripts if s.name == "metateach"] == ["metateach.cli:main"]
    done = subprocess.run(
        [sys.executable, "-m", "metateach", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for command in ("train", "compare", "reproduce", "bench", "fit-mentornet", "weight-drift"):
        assert re.search(rf"^  {command} +\w", done.stdout, re.M), done.stdout
    code = cli_main(
        ["train", str(CONFIGS / "quickstart.yaml"), *QUIET, f"train.out_dir={tmp_path}",
         "train.epochs=1", "train.run_name=one"]
    )  # fmt: skip
    assert code == 0
    assert "after 1 epochs" in capsys.readouterr().out
    assert (tmp_path / "one" / "summary.json").is_file()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["tran", "configs/quickstart.yaml"])
    assert exit_.value.code == 2
    assert "invalid choice: 'tran'" in capsys.readouterr().err


def test_a_subcommand_names_itself_in_its_help(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["compare", "--help"])
    assert capsys.readouterr().out.startswith("usage: metateach compare ")
