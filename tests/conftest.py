"""Shared fixtures: small, seeded configurations and the real data sets."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metateach.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
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


@pytest.fixture(autouse=True)
def _quiet_and_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may touch the network, and every test starts from one seed.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.manual_seed(0)


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
