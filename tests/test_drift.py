"""The weight drift (metateach.lab.drift): its split adds up, its arms start alike and stay apart, the run
it starts from is left as it was, and bad input ends in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from metateach.checkpoint import load_checkpoint
from metateach.errors import ConfigError
from metateach.lab.drift import DriftRecord, main, weight_drift

from .conftest import CONFIGS

QUICKSTART = str(CONFIGS / "quickstart.yaml")
#: Deep interaction stepping its teacher after every student step, on the quickstart's digits at 40% noise.
TAUGHT = [
    "teacher.name=deep_interaction", "teacher.hypergrad.inner_steps=1",
    "teacher.hypergrad.backprop_steps=1", "teacher.optim.name=adam", "teacher.optim.lr=0.01",
    "noise.rate=0.4", "train.epochs=2", "model.kwargs.hidden=[32]",
]  # fmt: skip


def _teacher(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoints" / "last.pt")["teacher"]


def _step(folder: Path) -> int:
    return load_checkpoint(folder / "checkpoints" / "last.pt")["progress"]["step"]


def test_the_split_adds_up_and_the_arms_start_alike_and_part(tmp_path: Path) -> None:
    overrides = [*TAUGHT, f"train.out_dir={tmp_path}"]
    record, folder = weight_drift(QUICKSTART, overrides, start=8, steps=10, probe=300)
    assert folder == tmp_path / "quickstart-drift8"
    assert record.steps == list(range(8, 19))
    learning = np.array(record.learning)
    # The two parts add up to the learning arm's change, in either order of the split.
    for teacher, student in (
        ("teacher_part", "student_part"),
        ("teacher_part_after", "student_part_before"),
    ):
        parts = np.array(getattr(record, teacher)) + np.array(getattr(record, student))
        np.testing.assert_allclose(learning[0] + parts, learning, rtol=0, atol=1e-12)
    # All three readings start from the same state; the learning teacher then moves.
    assert record.held[0] == record.learning[0] == record.start_teacher[0]
    assert np.abs(np.array(record.teacher_part)[-1]).max() > 1e-4
    assert np.abs(learning[-1] - np.array(record.held[-1])).max() > 1e-4
    # The held arm's teacher is the start's; the learning arm's is not. The start's folder stays at step 8.
    start, held = _teacher(folder), _teacher(tmp_path / "quickstart-drift8-held")
    learned = _teacher(tmp_path / "quickstart-drift8-learning")
    assert all(torch.equal(start[k], held[k]) for k in start)
    assert not all(torch.equal(start[k], learned[k]) for k in start)
    assert _step(folder) == 8
    assert _step(tmp_path / "quickstart-drift8-held") == 18
    assert DriftRecord.load(folder / "drift.json") == record
    assert (folder / "drift.png").stat().st_size > 0
    # Again: the run at step 8 is found, not trained again, and the arms read the same.
    written = (folder / "checkpoints" / "last.pt").stat().st_mtime_ns
    again, _ = weight_drift(QUICKSTART, overrides, start=8, steps=10, probe=300)
    assert (folder / "checkpoints" / "last.pt").stat().st_mtime_ns == written
    assert again == record


@pytest.mark.parametrize(
    ("overrides", "start", "message"),
    [
        (["teacher.name=none"], 4, r"teacher.name='none' .* a teacher that learns"),
        ([*TAUGHT, "teacher.learn=false"], 4, r"teacher.learn=False: .* a teacher that learns"),
        (["noise.rate=0.4"], 4, r"'learning_to_reweight' has no parameters"),  # the quickstart's
        (["teacher.name=l2t_dln", "noise.rate=0.4"], 4, r"teacher \w+ gives no per-sample weights"),
        ([*TAUGHT, "noise.rate=0.0"], 4, r"probe's 300 training images are all clean"),
        (TAUGHT, 0, r"--start and --steps must be at least 1"),
    ],
)
def test_bad_input_is_refused_by_name(
    tmp_path: Path, overrides: list[str], start: int, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        weight_drift(QUICKSTART, [*overrides, f"train.out_dir={tmp_path}"], start, 2, probe=300)
    assert not list(tmp_path.glob("*/checkpoints/*.pt"))  # refused before any training


def test_a_folder_past_the_start_is_refused(tmp_path: Path) -> None:
    overrides = [*TAUGHT, f"train.out_dir={tmp_path}"]
    weight_drift(QUICKSTART, overrides, start=6, steps=1, probe=300)
    (tmp_path / "quickstart-drift6").rename(tmp_path / "quickstart-drift4")
    with pytest.raises(
        ConfigError, match=r"quickstart-drift4 holds the run at step 6, past --start 4"
    ):
        weight_drift(QUICKSTART, overrides, start=4, steps=1, probe=300)


def test_the_command_prints_the_table_or_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [QUICKSTART, "--start", "4", "--steps", "4", "--probe", "300", "--every", "2"]
    assert main([*argv, *TAUGHT, f"train.out_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "| 4 |" in out and "| 6 |" in out and "| 8 |" in out
    assert f"results: {tmp_path / 'quickstart-drift4'}/drift.json" in out
    assert main([*argv, "teacher.name=none", f"train.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teacher.name='none'") and err.count("\n") == 1
