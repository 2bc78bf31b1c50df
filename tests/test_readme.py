"""The README's and the docs' promises: the examples run as shown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metateach.trainer import Trainer

from .conftest import CONFIGS, REPO


def readme_block(marker: str, page: str = "README.md") -> str:
    """The fenced code block of ``page`` (README.md or a docs page) that begins with ``marker``."""
    for block in re.findall(r"```(?:python|bash)\n(.*?)```", (REPO / page).read_text(), re.S):
        if block.startswith(marker):
            return block
    raise AssertionError(f"{page} has no code block starting with {marker!r}")


def test_the_example_teacher_trains_through_a_plugin(
    make_config, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_teachers.py").write_text(readme_block("# my_teachers.py"))
    command = readme_block("python tools/train.py configs/quickstart.yaml plugins=")
    overrides = command.split()[3:]  # after "python tools/train.py configs/quickstart.yaml"
    assert overrides == ["plugins=[my_teachers.py]", "teacher.name=margin_weighting"]
    trainer = Trainer(make_config(*overrides, "train.epochs=3", path=CONFIGS / "quickstart.yaml"))
    start = [p.detach().clone() for p in trainer.teaching.teacher.parameters()]
    metrics = trainer.fit()
    assert metrics["test/acc"] > 0.8
    moved = [
        not torch.equal(a, p)
        for a, p in zip(start, trainer.teaching.teacher.parameters(), strict=True)
    ]
    assert all(moved)  # both of its parameters learned


@pytest.mark.parametrize(
    ("script", "page", "printed"),
    [
        (
            "check_my_teacher.py",
            "README.md",
            "lookahead against central differences (window): passed",
        ),
        (
            "hypergradient_in_code.py",
            "docs/writing-a-teacher.md",
            "{'scale': (), 'class_bias': (10,)}",
        ),
        (
            "step_teacher.py",
            "docs/writing-a-teacher.md",
            "reversible against central differences (window): passed",
        ),
    ],
)
def test_the_hypergradient_examples_run_as_shown(
    tmp_path: Path, script: str, page: str, printed: str
) -> None:
    # Run as a reader runs them: a script beside my_teachers.py, in a fresh interpreter.
    (tmp_path / "my_teachers.py").write_text(readme_block("# my_teachers.py"))
    (tmp_path / script).write_text(readme_block(f"# {script}", page))
    done = subprocess.run(
        [sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert printed in done.stdout


@pytest.mark.slow  # trains the quickstart in a subprocess: about 19 s
def test_the_python_example_trains_and_names_its_run(tmp_path: Path) -> None:
    # As a reader runs it: from a checkout (here, its configs beside the script).
    (tmp_path / "configs").symlink_to(CONFIGS)
    script = readme_block("# train_in_python.py")
    (tmp_path / "train_in_python.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    done = subprocess.run(
        [sys.executable, "train_in_python.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"test accuracy (\d\.\d{3}), run folder (\S+)", done.stdout)
    assert match, done.stdout
    assert 0.5 < float(match.group(1)) <= 1
    run = tmp_path / match.group(2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test/acc"] == pytest.approx(float(match.group(1)), abs=5e-4)
    assert "epochs: 5" in (run / "config.yaml").read_text()  # the override reached the run


def test_the_docs_include_the_readme_examples_rather_than_copy_them() -> None:
    page = (REPO / "docs" / "writing-a-teacher.md").read_text()
    readme = (REPO / "README.md").read_text()
    for section in ("my_teachers", "check_my_teacher"):
        assert f'--8<-- "README.md:{section}"' in page
        assert f"<!-- --8<-- [start:{section}] -->" in readme
        assert f"<!-- --8<-- [end:{section}] -->" in readme
