"""The README's promises: the examples run as shown."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metateach.trainer import Trainer

from .conftest import CONFIGS, REPO


def readme_block(marker: str) -> str:
    """The fenced code block of README.md that begins with ``marker``."""
    for block in re.findall(
        r"```(?:python|bash)\n(.*?)```", (REPO / "README.md").read_text(), re.S
    ):
        if block.startswith(marker):
            return block
    raise AssertionError(f"README.md has no code block starting with {marker!r}")


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
    ("script", "printed"),
    [
        ("check_my_teacher.py", "lookahead against central differences (window): passed"),
        ("hypergradient_in_code.py", "{'scale': (), 'class_bias': (10,)}"),
    ],
)
def test_the_hypergradient_examples_run_as_shown(tmp_path: Path, script: str, printed: str) -> None:
    # Run as a reader runs them: a script beside my_teachers.py, in a fresh interpreter.
    (tmp_path / "my_teachers.py").write_text(readme_block("# my_teachers.py"))
    (tmp_path / script).write_text(readme_block(f"# {script}"))
    done = subprocess.run(
        [sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert printed in done.stdout
