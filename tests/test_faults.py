"""Faults a long run must survive, and bad input that must end in one line naming the problem."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from metateach.checkpoint import load_checkpoint
from metateach.cli import train_main as main
from metateach.config import load_config
from metateach.logging import read_metrics
from metateach.trainer import Trainer

from .conftest import (
    CONFIGS,
    QUICK,
    REPO,
    kill_once_checkpointed,
    wait_for_checkpoint,
    without_measurements,
)

# --------------------------------------------------------------------------- #
# A run killed outright
# --------------------------------------------------------------------------- #

#: The quickstart (Learning-to-Reweight on the digits), 6 epochs of 20 steps, one thread,
#: a checkpoint every 7 steps.
KILLABLE = ["train.epochs=6", "train.threads=1", "train.checkpoint_every_steps=7",
            "logging.wandb=disabled", "logging.plots=false", "train.progress=false"]  # fmt: skip


def test_a_run_killed_mid_epoch_and_resumed_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    command = [sys.executable, "tools/train.py", str(CONFIGS / "quickstart.yaml"), *KILLABLE,
               f"train.out_dir={tmp_path}", "train.run_name=killed"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Killed once a checkpoint past the first epoch is on disk.
    cut = kill_once_checkpointed(process, run, past_step=20)
    assert 20 < cut < 120 and not (run / "summary.json").exists()
    assert_resumes_as_if_never_stopped(run, tmp_path)


def assert_resumes_as_if_never_stopped(run: Path, tmp_path: Path) -> None:
    """Resumed, the stopped ``run`` ends with the weights and metrics of one that never stopped."""
    threads = torch.get_num_threads()
    try:
        resumed = Trainer(
            load_config(CONFIGS / "quickstart.yaml", [*KILLABLE, f"train.resume={run}"])
        )
        final = resumed.fit()
        straight = Trainer(load_config(CONFIGS / "quickstart.yaml",
                                       [*KILLABLE, f"train.out_dir={tmp_path}", "train.run_name=straight"]))  # fmt: skip
        expected = straight.fit()
    finally:
        torch.set_num_threads(threads)
    assert without_measurements(final) == without_measurements(expected)
    for a, b in zip(
        resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    epochs = [without_measurements(r) for r in read_metrics(run) if "epoch" in r]
    assert epochs == [
        without_measurements(r) for r in read_metrics(straight.run_dir) if "epoch" in r
    ]
    assert json.loads((run / "summary.json").read_text())["test/acc"] == expected["test/acc"]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_a_run_at_a_step_saved_and_it_resumes_to_the_same_end(
    tmp_path: Path, signum: int, status: int
) -> None:
    run = tmp_path / "signalled"
    command = [sys.executable, "tools/train.py", str(CONFIGS / "quickstart.yaml"), *KILLABLE,
               f"train.out_dir={tmp_path}", "train.run_name=signalled"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(process, run, past_step=20)  # Learning-to-Reweight, mid-run
    sent = time.monotonic()
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 5
    assert process.returncode == status, err
    name = signal.Signals(signum).name
    assert re.fullmatch(
        rf"stopped by {name} after step (\d+) \(epoch \d\); the state is saved: "
        rf"continue with train.resume={re.escape(str(run))}\n",
        err,
    ), err
    stopped = int(re.search(r"after step (\d+)", err).group(1))
    assert load_checkpoint(run)["progress"]["step"] == stopped  # saved at the step it names
    assert not (run / "summary.json").exists()
    assert_resumes_as_if_never_stopped(run, tmp_path)


def test_wandb_in_an_unwritable_place_warns_once_and_training_goes_on(
    tmp_path: Path, capsys
) -> None:
    quick = [*QUICK, f"train.out_dir={tmp_path}", "train.progress=false"]
    assert main([str(CONFIGS / "quickstart.yaml"), *quick, "train.run_name=r"]) == 0
    run = tmp_path / "r"
    (run / "wandb").write_text("a file where W&B wants its folder")  # W&B cannot write there
    capsys.readouterr()
    resumed = [str(CONFIGS / "quickstart.yaml"), *quick, "train.epochs=3", "logging.wandb=offline",
               f"train.resume={run}"]  # fmt: skip
    assert main(resumed) == 0
    err = capsys.readouterr().err
    assert len(re.findall(r"warning: W&B (could not start|failed)", err)) == 1, err
    assert f"metrics go to {run / 'metrics.jsonl'} only" in err
    assert [r["epoch"] for r in read_metrics(run) if "epoch" in r] == [1, 2, 3]


def test_a_run_skips_and_counts_non_finite_hypergradients_and_goes_on(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metateach.hypergrad.lookahead import Lookahead

    exact = Lookahead.teacher_gradient
    calls = []

    def every_third_blows_up(self, params, batch, train):  # type: ignore[no-untyped-def]
        found = exact(self, params, batch, train)
        calls.append(len(calls))
        if len(calls) % 3:
            return found
        return [None if g is None else torch.full_like(g, float("inf")) for g in found]

    monkeypatch.setattr(Lookahead, "teacher_gradient", every_third_blows_up)
    trainer = Trainer(make_config("teacher.name=meta_weight_net", "train.epochs=1",
                                  "logging.every_steps=5"))  # fmt: skip
    before = [p.detach().clone() for p in trainer.teaching.teacher.parameters()]
    metrics = trainer.fit()
    steps = len(calls)
    assert steps == trainer.state.step == 20  # a teacher step tried at every student step
    assert trainer.teaching.strategy.skipped == steps // 3
    logged = [r["teacher/skipped_steps"] for r in read_metrics(trainer.run_dir)
              if "teacher/skipped_steps" in r]  # fmt: skip
    assert logged[-1] == steps // 3 and logged == sorted(logged)
    after = list(trainer.teaching.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # it learned
    assert all(torch.isfinite(p).all() for p in after)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert metrics["test/acc"] > 0.5


# --------------------------------------------------------------------------- #
# Bad input: one line, exit status 2
# --------------------------------------------------------------------------- #


def trained_run(tmp_path: Path) -> Path:
    """A finished one-epoch run of the quickstart (hidden layer of 16)."""
    assert main([str(CONFIGS / "quickstart.yaml"), *QUICK, f"train.out_dir={tmp_path}",
                 "train.run_name=done", "train.progress=false"]) == 0  # fmt: skip
    return tmp_path / "done"


def corrupt_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 half of a zip archive")
    return path


def image_folder_without_images(tmp_path: Path) -> Path:
    for split in ("train", "test"):
        (tmp_path / "tree" / split / "cat").mkdir(parents=True)
        (tmp_path / "tree" / split / "cat" / "notes.txt").write_text("not an image")
    return tmp_path / "tree"


QUICKSTART = str(CONFIGS / "quickstart.yaml")

#: (what is wrong, the command line given the test folder, the one-line error).
BAD_INPUT: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("unknown key", lambda t: [QUICKSTART, "train.epoch=3"],
     r"overrides: unknown key 'train.epoch'; valid keys in 'train': epochs, batch_size, "),
    ("wrong type", lambda t: [QUICKSTART, "train.epochs=three"],
     r"overrides: wrong type for train.epochs: Value 'three' of type 'str' could not be converted to Integer"),
    ("negative learning rate", lambda t: [QUICKSTART, "optim.lr=-0.1"],
     r"optim.lr must be > 0, got -0.1"),
    ("B > K", lambda t: [QUICKSTART, "teacher.name=deep_interaction",
                         "teacher.hypergrad.inner_steps=2", "teacher.hypergrad.backprop_steps=3"],
     r"teacher.hypergrad.backprop_steps \(B=3\) must not exceed teacher.hypergrad.inner_steps \(K=2\)"),
    ("noise rate of 1", lambda t: [QUICKSTART, "noise.rate=1.0"],
     r"noise.rate must be in \[0, 1\), got 1.0"),
    ("negative noise rate", lambda t: [QUICKSTART, "noise.rate=-0.2"],
     r"noise.rate must be in \[0, 1\), got -0.2"),
    ("unknown dataset", lambda t: [QUICKSTART, "data.name=imagenet"],
     r"unknown dataset 'imagenet' \(data.name\); available: cifar10, cifar100, digits, "),
    ("unknown model", lambda t: [QUICKSTART, "model.name=vgg"],
     r"unknown model 'vgg' \(model.name\); available: cifar_resnet, "),
    ("unknown teacher", lambda t: [QUICKSTART, "teacher.name=oracle"],
     r"unknown teacher 'oracle' \(teacher.name\); available: co_teaching, "),
    ("data root without the data", lambda t: [QUICKSTART, "data.name=mnist", f"data.root={t}"],
     r"MNIST not found under data root '.*': expected .*/MNIST/raw/train-images-idx3-ubyte"),
    ("corrupt checkpoint", lambda t: [QUICKSTART, f"train.resume={corrupt_checkpoint(t)}"],
     r"cannot read checkpoint .*corrupt.pt: "),
    ("checkpoint of another model", lambda t: [QUICKSTART, *QUICK, "model.kwargs.hidden=[64]",
                                               f"train.resume={trained_run(t)}"],
     r"checkpoint .*last.pt belongs to a different experiment: model.kwargs.hidden was \[16\], "
     r"the config now says \[64\]"),
    ("image folder with no images", lambda t: [QUICKSTART, "data.name=imagefolder",
                                               f"data.root={image_folder_without_images(t)}"],
     r"imagefolder .*tree/train: Found no valid file for the classes cat"),
    ("mask-only teacher asked for weights", lambda t: [QUICKSTART, "teacher.name=l2t",
                                                       "teacher.hypergrad.method=lookahead"],
     r"teacher.hypergrad.method is set, but teacher 'l2t' does not learn by hypergradient \(it learns "
     r"by REINFORCE from the lessons it samples; its settings go in teacher.policy\): remove "
     r"teacher.hypergrad.method, or pick a teacher that does \(meta_weight_net, "),
    ("teacher option out of range", lambda t: [QUICKSTART, "teacher.name=random_filter",
                                               "teacher.kwargs.keep=1.5"],
     r"teacher 'random_filter' \(teacher.name\) with teacher.kwargs=\{'keep': 1.5\}: keep must be in \(0, 1\]"),
    ("missing config file", lambda t: [str(t / "nope.yaml")],
     r"config file not found: .*nope.yaml"),
    ("run name that climbs out", lambda t: [QUICKSTART, "train.run_name=../../x"],
     r"train.run_name='../../x' must be a single folder name \(no '/', no '..'\): runs stay "
     r"inside their output folder"),
    ("absolute run name", lambda t: [QUICKSTART, f"train.run_name={t / 'elsewhere'}"],
     r"train.run_name='/.*/elsewhere' must be a single folder name"),
    ("checkpoint of an unknown format", lambda t: [QUICKSTART, *QUICK,
                                                   f"train.resume={reformatted(trained_run(t))}"],
     r"checkpoint .*last.pt has format 999; this metateach reads format 1 \(a newer metateach"),
]  # fmt: skip


def reformatted(run: Path) -> Path:
    """``run`` with its last checkpoint claiming a format no metateach wrote."""
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, "format": 999}, last)
    return run


@pytest.mark.parametrize(
    ("argv", "message"), [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT]
)
def test_bad_input_ends_in_one_line_naming_the_problem(
    tmp_path: Path, capsys, argv: Callable[[Path], list[str]], message: str
) -> None:
    config, *overrides = argv(tmp_path)
    capsys.readouterr()
    quiet = ["logging.wandb=disabled", f"train.out_dir={tmp_path / 'runs'}", "train.progress=false",
             "train.epochs=1"]  # fmt: skip
    code = main([config, *quiet, *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.match(message, err.removeprefix("error: ")), err


# --------------------------------------------------------------------------- #
# Run folders: one owner, names inside the output folder
# --------------------------------------------------------------------------- #


def test_a_second_run_under_a_name_in_use_is_refused_and_the_first_is_intact(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "shared"
    first = [sys.executable, "tools/train.py", str(CONFIGS / "quickstart.yaml"), *KILLABLE,
             f"train.out_dir={tmp_path}", "train.run_name=shared", "train.seed=0",
             "train.epochs=30"]  # fmt: skip
    process = subprocess.Popen(first, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(process, run, past_step=0)
        second = [str(CONFIGS / "quickstart.yaml"), *KILLABLE, f"train.out_dir={tmp_path}",
                  "train.run_name=shared", "train.seed=1"]  # fmt: skip
        assert main(second) == 2
        assert process.poll() is None  # the first still trains
        err = capsys.readouterr().err
        assert re.fullmatch(
            rf"error: run folder {re.escape(str(run))} is in use by another run "
            rf"\(process {process.pid}\); wait for it to end, or choose another train.run_name\n",
            err,
        ), err
    finally:
        assert process.wait(timeout=300) == 0
    assert "seed: 0" in (run / "config.yaml").read_text()
    assert json.loads((run / "summary.json").read_text())["steps"] == 600
    assert [r["epoch"] for r in read_metrics(run) if "epoch" in r] == list(range(1, 31))
    # Once the first has ended, the name is taken by a finished run, and says so.
    assert main(second) == 2
    assert "already exists; continue it with train.resume=" in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint_says_how_to_start_again(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text("written before the run was killed\n")
    argv = [QUICKSTART, *QUICK, f"train.out_dir={tmp_path}", "train.progress=false"]
    assert main([*argv, "train.run_name=early"]) == 2
    assert capsys.readouterr().err == (
        f"error: run folder {run} already exists; it holds no checkpoint (its run stopped before "
        "saving one): delete it to start again, or choose another train.run_name\n"
    )
    assert main([*argv, f"train.resume={run}"]) == 2
    assert capsys.readouterr().err == (
        f"error: run folder {run} holds no checkpoint: its run stopped before saving one; delete "
        "the folder to start that run again\n"
    )


def test_a_loose_checkpoint_resumes_into_a_new_run_folder(tmp_path: Path) -> None:
    done = trained_run(tmp_path)
    loose = tmp_path / "handed_over" / "model.pt"
    loose.parent.mkdir()
    loose.write_bytes((done / "checkpoints" / "last.pt").read_bytes())
    argv = [QUICKSTART, *QUICK, f"train.out_dir={tmp_path / 'runs'}", "train.progress=false",
            "train.epochs=2", f"train.resume={loose}", "train.run_name=continued"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in loose.parent.iterdir()) == ["model.pt"]  # nothing beside it
    continued = tmp_path / "runs" / "continued"
    assert [r["epoch"] for r in read_metrics(continued) if "epoch" in r] == [2]
    assert main(argv) == 2  # a second loose resume under that name cannot overwrite it
