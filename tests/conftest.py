"""Shared fixtures: small, seeded configurations and the real data sets."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metateach.checkpoint import load_checkpoint
from metateach.config import load_config
from metateach.errors import CheckpointError
from metateach.report.diagnostics import SampleRecord

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
#: A one-epoch quickstart on 200 images, without W&B or plots: runs of comparisons and suites.
QUICK = ["train.epochs=1", "data.train_subset=200", "logging.wandb=disabled", "logging.plots=false",
         "model.kwargs.hidden=[16]"]  # fmt: skip
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@pytest.fixture(scope="session")
def _wandb_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wandb-data")


@pytest.fixture(autouse=True)
def _quiet_and_seeded(monkeypatch: pytest.MonkeyPatch, _wandb_data: Path) -> None:
    # No test may touch the network, and every test starts from one seed. W&B stages what
    # offline runs log as artifacts (tables) in a folder of the tests', not the user's.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DATA_DIR", str(_wandb_data))
    torch.manual_seed(0)


def cifar_batch(n: int, key: str, num_classes: int, seed: int = 0) -> dict:
    """A pickled CIFAR batch's content: random images, labels cycling through the classes."""
    rng = np.random.default_rng(seed)
    return {
        "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
        key: list(np.arange(n) % num_classes),
    }


def layered(*lists: list[str]) -> list[str]:
    """Override lists joined, a later list's value of a key replacing an earlier one's (a
    command line refuses a key given two values)."""
    merged: dict[str, str] = {}
    for item in (item for overrides in lists for item in overrides):
        key = item.partition("=")[0]
        merged.pop(key, None)
        merged[key] = item
    return list(merged.values())


def write_yaml(path: Path, content: dict) -> Path:
    """``content`` as a YAML file at ``path`` (keys in order); returns the path."""
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def write_cifar100(root: Path, train: int, test: int) -> None:
    """Small CIFAR-100 files in torchvision's layout under ``root``."""
    folder = root / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps(cifar_batch(train, "fine_labels", 100)))
    (folder / "test").write_bytes(pickle.dumps(cifar_batch(test, "fine_labels", 100, seed=1)))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def write_svhn(
    root: Path, train: int, test: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Small SVHN files in torchvision's layout under ``root``; returns each split's (X, y) as written."""
    import scipy.io

    rng = np.random.default_rng(seed)
    folder = root / "svhn"
    folder.mkdir()
    written = {}
    for split, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN writes digit 0 as label 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


@pytest.fixture
def skip_svhn_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks the md5 of the official files; the test's small files cannot match it.
    import torchvision.datasets.svhn as svhn

    monkeypatch.setattr(svhn.SVHN, "_check_integrity", lambda self: True)


@pytest.fixture
def skip_cifar_checksums(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks the md5 of the official files; the test's small files cannot match it.
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., object]:
    """An experiment writing into ``tmp_path``, quietly; extra ``key=value`` overrides apply.

    Without ``path`` it is a fast digits run with a small MLP.
    """

    def make(*overrides: str, path: str | Path | None = None) -> object:
        quiet = [
            "train.progress=false",
            f"train.out_dir={tmp_path / 'runs'}",
            "logging.wandb=disabled",
            "logging.plots=false",
        ]
        small = [] if path else ["train.epochs=2", "train.batch_size=64"]
        if not path and not any(o.startswith("model.") for o in overrides):
            small.append("model.kwargs.hidden=[32]")
        return load_config(path, [*small, *quiet, *overrides])

    return make


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The folder holding the real MNIST and CIFAR-10-JPEG: $METATEACH_DATA or ../shared/data.

    Tests that use it are marked ``real_data``; ``.ci/run`` runs them with the
    data present, and a missing folder fails them rather than skipping.
    """
    root = Path(os.environ.get("METATEACH_DATA") or REPO.parent / "shared" / "data")
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.fail(
            f"real data not found under {root}; set METATEACH_DATA to the folder holding MNIST/raw"
        )
    return root


def without_measurements(metrics: dict) -> dict:
    """A record without what the machine measures (time, and memory that depends on allocation)."""
    measured = ("perf/", "teacher/update_seconds", "teacher/graph_")
    return {k: v for k, v in metrics.items() if not k.startswith(measured)}


def wait_for_checkpoint(process: subprocess.Popen, run: Path, past_step: int) -> None:
    """Return once ``run`` holds a checkpoint past ``past_step``, while ``process`` runs on."""
    last = run / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while True:
        try:
            if last.is_file() and load_checkpoint(last)["progress"]["step"] > past_step:
                return
        except CheckpointError:  # being replaced just now
            pass
        assert process.poll() is None, "the run ended before it was stopped"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def kill_once_checkpointed(process: subprocess.Popen, run: Path, past_step: int) -> int:
    """SIGKILL ``process`` and its descendants once ``run`` holds a checkpoint past ``past_step``.

    No handler runs and no file is closed (torchrun's workers, in sessions of
    their own, go too). Returns the step of the checkpoint the kill left.
    """
    wait_for_checkpoint(process, run, past_step)
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has just ended
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [process.pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for each in tree:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(each, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    return load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"]


def sample_record(path, epochs: int = 10, n: int = 200, seed: int = 0):
    """A sample record in which the mislabeled samples' losses stay high and the others' fall."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 10, n)
    noisy = rng.random(n) < 0.3
    targets = np.where(noisy, (clean + 1) % 10, clean)
    progress = np.arange(1, epochs + 1) / epochs
    low = rng.exponential(0.3, (epochs, n)) * (1 - progress[:, None])
    losses = np.where(noisy, 3 + rng.exponential(1.0, (epochs, n)), low).astype(np.float32)
    record = SampleRecord(
        index=np.arange(n), targets=targets, clean_targets=clean,
        episode=np.zeros(epochs, dtype=np.int64), epoch=np.arange(1, epochs + 1),
        progress=progress, losses=losses, weights=np.ones((epochs, n), np.float32),
    )  # fmt: skip
    return record, record.save(path)
