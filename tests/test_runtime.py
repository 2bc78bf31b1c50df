"""metateach.runtime: the process settings a run makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

#: A step's activations in small: 20 tensors of 8 MiB alive at once, then all freed; the
#: page faults of the last 3 of 5 such steps.
FAULTS = """
import resource, sys, torch
from metateach.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    return [torch.full((1 << 21,), float(i)) for i in range(20)]
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux only")
def test_kept_memory_serves_the_next_tensor_without_fresh_pages() -> None:
    def faults(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
        )
        return int(done.stdout.strip())

    # 160 MiB are 40,960 pages a step. By default glibc gives the heap's free top back once it
    # passes twice the largest block freed so far, so the steps fault many pages in again
    # (about 43,000 over three steps here); kept, the first steps' pages serve the rest.
    assert faults("default") > 20_000
    assert faults("keep") < 2_000


def test_a_trainer_keeps_freed_memory_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from metateach import trainer
    from metateach.config import load_config
    from metateach.lab.bench import random_bundle

    calls: list[int] = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or True)
    data = random_bundle(8, 8, (1, 8, 8), 10)
    for setting, expected in (("true", 1), ("false", 1)):
        cfg = load_config(
            None,
            ["model.name=mlp", "logging.wandb=disabled", "train.progress=false",
             f"train.keep_freed_memory={setting}", "train.device=cpu",
             f"train.out_dir={tmp_path}", f"train.run_name=run-{setting}"],
        )  # fmt: skip
        trainer.Trainer(cfg, data=data)
        assert len(calls) == expected, setting
