"""Your own teacher in a file of your own, as a new user writes one, wherever runs train."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metateach.config import load_config
from metateach.errors import ConfigError
from metateach.registry import TEACHERS, Registry
from metateach.trainer import Trainer

from .conftest import CONFIGS, REPO

#: A 20-line teacher: a learned weight per class, named by a plugin file.
CLASS_WEIGHT = """
import torch
from torch import nn

from metateach import Lesson, Teacher, TEACHERS
from metateach.teacher import Hypergradient


@TEACHERS.register("class_weight")
class ClassWeight(Teacher):
    learns = Hypergradient("lookahead")

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes))

    def forward(self, batch, view):
        weights = torch.sigmoid(self.logits)[batch.y] * 2
        return Lesson(weights=weights)
"""


def experiment(folder: Path) -> Path:
    """A config in ``folder`` that names the plugin file beside it, on the quickstart."""
    folder.mkdir(exist_ok=True)
    (folder / "class_weight.py").write_text(CLASS_WEIGHT)
    config = folder / "experiment.yaml"
    config.write_text(
        f"base: {CONFIGS / 'quickstart.yaml'}\n"
        "plugins: [class_weight.py]\n"
        "teacher: {name: class_weight}\n"
        "train: {epochs: 1, threads: 1}\n"
        "model: {kwargs: {hidden: [16]}}\n"
        "logging: {wandb: disabled, plots: false, diagnostics: false}\n"
    )
    return config


def test_a_plugin_file_is_found_beside_the_config_that_names_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(TEACHERS, "_entries", dict(TEACHERS._entries))
    config = experiment(tmp_path / "lab")
    monkeypatch.chdir(tmp_path)  # elsewhere than the config
    cfg = load_config(config)
    assert cfg.plugins == [str(tmp_path / "lab" / "class_weight.py")]
    assert cfg.teacher.name == "class_weight"


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    (tmp_path / "lab").mkdir()
    return tmp_path / "lab"


def test_a_comparison_trains_a_plugin_teacher_in_its_worker_processes(lab: Path) -> None:
    config = experiment(lab)
    comparison = lab / "comparison.yaml"
    comparison.write_text(
        "config: experiment.yaml\nseeds: [0]\n"
        "variants:\n  none: [teacher.name=none]\n  class_weight: [teacher.name=class_weight]\n"
    )
    assert config.is_file()
    done = subprocess.run(
        [sys.executable, "tools/compare.py", str(comparison), "--jobs", "2",
         "--out", str(lab / "runs")],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = lab / "runs" / "comparison"
    summary = json.loads((runs / "class_weight-seed0" / "summary.json").read_text())
    assert 0 < summary["test/acc"] <= 1


def test_registering_the_same_builder_again_does_nothing_and_another_is_refused() -> None:
    registry: Registry = Registry("teacher", "teacher.name")

    def mine() -> None: ...

    def other() -> None: ...

    registry.register("mine")(mine)
    registry.register("mine")(mine)  # a notebook cell run twice, a module imported twice
    assert registry.get("mine") is mine
    with pytest.raises(ValueError, match="teacher 'mine' is registered twice"):
        registry.register("mine")(other)


def test_an_unknown_teacher_met_by_a_trainer_is_named_once(tmp_path: Path) -> None:
    """A trainer in a worker builds from a config it did not load: the error is the registry's."""
    cfg = load_config(CONFIGS / "quickstart.yaml", [f"train.out_dir={tmp_path}"])
    cfg.teacher.name = "class_weight"  # as in a worker that had not imported the plugin
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    assert str(info.value).count("unknown teacher 'class_weight'") == 1


@pytest.mark.parametrize("first", ["plugin", "import"])
def test_a_plugin_file_and_an_import_of_it_register_once(
    first: str, tmp_path: Path, monkeypatch
) -> None:
    """A script or notebook beside the file imports it and also lists it in a config."""
    monkeypatch.setattr(TEACHERS, "_entries", dict(TEACHERS._entries))
    name = f"class_weight_{first}"  # a module name no other test has taken
    (tmp_path / f"{name}.py").write_text(CLASS_WEIGHT)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    overrides = [f"plugins=[{name}.py]", "teacher.name=class_weight", f"train.out_dir={tmp_path}"]
    if first == "import":
        module = importlib.import_module(name)
    load_config(CONFIGS / "quickstart.yaml", overrides)
    load_config(CONFIGS / "quickstart.yaml", overrides)  # a notebook cell run again
    if first == "plugin":
        module = importlib.import_module(name)
    assert TEACHERS.get("class_weight") is module.ClassWeight
    monkeypatch.delitem(sys.modules, name)
