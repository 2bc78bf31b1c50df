"""Faults a long run must survive, and bad input that must end in one line naming the problem."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from metateach.checkpoint import load_checkpoint
from metateach.cli import train_main as main
from metateach.config import load_config
from metateach.logging import read_metrics
from metateach.runtime import stops_on_signals
from metateach.trainer import Trainer

from .conftest import (
    CONFIGS,
    QUICK,
    REPO,
    kill_once_checkpointed,
    layered,
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
    epochs = [without_measurements(r) for r in read_metrics(run) if "trainer/epoch" in r]
    assert epochs == [
        without_measurements(r) for r in read_metrics(straight.run_dir) if "trainer/epoch" in r
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


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_a_comparison_with_each_run_in_progress_saved(
    tmp_path: Path, jobs: int
) -> None:
    # In one process the run's own handler stops it (an exit raised from the signal handler
    # could land in a finalizer, which swallows it, and the run went on); with workers, the
    # parent's pool sends each one SIGTERM and waits for it to save.
    comparison = tmp_path / "cut.yaml"
    comparison.write_text(
        f"config: {CONFIGS / 'quickstart.yaml'}\nseeds: [0, 1]\nvariants:\n  a: []\n"
    )
    command = [sys.executable, "tools/compare.py", str(comparison),
               *layered(KILLABLE, ["train.checkpoint_every_steps=null"]),
               f"--out={tmp_path}", f"--jobs={jobs}"]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    runs = [tmp_path / "cut" / f"a-seed{seed}" for seed in range(jobs)]
    for run in runs:  # each past its second epoch's checkpoint, the only kind it takes
        wait_for_checkpoint(process, run, past_step=20)
    before = [load_checkpoint(run)["progress"]["step"] for run in runs]
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    for run, step in zip(runs, before, strict=True):
        saved = load_checkpoint(run)["progress"]
        assert saved["step"] > step, err  # saved where it stopped, not at its last epoch's end
        assert not (run / "summary.json").exists()
    assert "stopped by SIGTERM" in err and "run the same command again to continue" in err, err


def test_a_process_that_ignores_ctrl_c_goes_on_ignoring_it_and_stops_on_sigterm() -> None:
    # A comparison's worker: Ctrl-C is its parent's, whose one SIGTERM must be the worker's first signal.
    trainer = SimpleNamespace(world=SimpleNamespace(size=1), stop_signal=None)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stops_on_signals(trainer):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert trainer.stop_signal is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert trainer.stop_signal == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_wandb_in_an_unwritable_place_warns_once_and_training_goes_on(
    tmp_path: Path, capsys
) -> None:
    quick = [*QUICK, f"train.out_dir={tmp_path}", "train.progress=false"]
    assert main([str(CONFIGS / "quickstart.yaml"), *quick, "train.run_name=r"]) == 0
    run = tmp_path / "r"
    (run / "wandb").write_text("a file where W&B wants its folder")  # W&B cannot write there
    capsys.readouterr()
    resumed = [str(CONFIGS / "quickstart.yaml"),
               *layered(quick, ["train.epochs=3", "logging.wandb=offline", f"train.resume={run}"])]  # fmt: skip
    assert main(resumed) == 0
    err = capsys.readouterr().err
    assert len(re.findall(r"warning: W&B (could not start|failed)", err)) == 1, err
    assert f"metrics go to {run / 'metrics.jsonl'} only" in err
    assert [r["trainer/epoch"] for r in read_metrics(run) if "trainer/epoch" in r] == [1, 2, 3]


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


def same_state(a: object, b: object, where: str = "") -> None:
    """Assert two checkpoints hold the same run state, bit for bit (timings and names aside)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        named = {str(k): k for k in a if k not in ("config", "seconds")}  # optimizer states: ints
        for key in map(named.get, without_measurements(named)):
            same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b or (a != a and b != b), where  # nan is the same nan


@pytest.mark.parametrize("teacher", ["learning_to_reweight", "meta_weight_net"])
def test_a_diverged_step_leaves_exactly_the_state_before_it_and_resumes_with_a_lower_rate(
    tmp_path: Path, capsys, teacher: str
) -> None:
    argv = [QUICKSTART, *QUICK, f"teacher.name={teacher}", f"train.out_dir={tmp_path}",
            "train.progress=false"]  # fmt: skip
    assert main([*argv, "optim.lr=1e10", "train.run_name=diverged"]) == 2
    run = tmp_path / "diverged"
    err = capsys.readouterr().err.splitlines()[-1]
    found = re.fullmatch(
        r"error: the training loss became non-finite at step (\d+) \(epoch 1, batch \d+\) and its "
        rf"step was not taken; the state before it is saved in {re.escape(str(run))}/checkpoints/"
        rf"last.pt, and the checkpoint it was rebuilt from \(step 0\) is kept as "
        rf"{re.escape(str(run))}/checkpoints/step0.pt; continue from a checkpoint with a lower "
        r"learning rate: train.resume=<checkpoint> optim.lr=<lower> "
        r"train.resume_with_changes=\[optim.lr\] \(or check the data\)",
        err,
    )
    assert found, err
    step = int(found.group(1))
    assert step >= 3  # the steps since the checkpoint at the start were replayed
    # The saved state is the one a run paused before that step saves: stream positions,
    # teacher, optimizers, the teacher's metric lists and random states, bit for bit.
    paused = Trainer(load_config(QUICKSTART, [*argv[1:], "optim.lr=1e10", "train.run_name=paused"]))
    paused.fit(max_steps=step - 1)
    saved = load_checkpoint(run)
    assert saved["progress"]["step"] == step - 1
    same_state(saved, load_checkpoint(paused.run_dir))
    # Resumed as it is, the same step diverges again.
    assert main([*argv, "optim.lr=1e10", f"train.resume={run}"]) == 2
    assert f"non-finite at step {step} " in capsys.readouterr().err
    # Another rate is another experiment, unless the change is named. The state just before
    # the step is past saving (the weights blew up over the steps before it); from the
    # checkpoint it was rebuilt from, the run goes on at the lower rate.
    start = run / "checkpoints" / "step0.pt"
    assert main([*argv, "optim.lr=0.001", f"train.resume={start}"]) == 2
    assert "add train.resume_with_changes=[optim.lr])" in capsys.readouterr().err
    changed = [
        *argv,
        "optim.lr=0.001",
        f"train.resume={start}",
        "train.resume_with_changes=[optim.lr]",
    ]
    assert main(changed) == 0
    records = read_metrics(run)
    assert {"step": 0, "trainer/resumed_with_changes": "optim.lr 10000000000.0 -> 0.001"} in records
    assert not any("step/nonfinite" in r for r in records)  # the records past step 0 went
    assert [r["trainer/epoch"] for r in records if "trainer/epoch" in r] == [1]
    assert json.loads((run / "summary.json").read_text())["trainer/steps"] == -(
        -200 // 64
    )  # an epoch of batches of 64
    assert load_checkpoint(run)["config"]["optim"]["lr"] == 0.001


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
     r"unknown teacher 'oracle' \(teacher.name\); available: adaptive_robust_loss, co_teaching, "),
    ("data root without the data", lambda t: [QUICKSTART, "data.name=mnist", f"data.root={t}"],
     r"MNIST not found under data root '.*': expected .*/MNIST/raw/train-images-idx3-ubyte"),
    ("corrupt checkpoint", lambda t: [QUICKSTART, f"train.resume={corrupt_checkpoint(t)}"],
     r"cannot read checkpoint .*corrupt.pt: "),
    ("checkpoint of another model", lambda t: [QUICKSTART, *layered(QUICK, ["model.kwargs.hidden=[64]"]),
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
    ("config that is not UTF-8", lambda t: [written(t, b"train:\n  epochs: 1\n# caf\xe9\n")],
     r"config file .*bad.yaml is not UTF-8 text: byte 0xe9 on line 3"),
    ("config with a YAML syntax error", lambda t: [written(t, b"train:\n  epochs: [1\n  seed: 2\n")],
     r"config file .*bad.yaml is not valid YAML at line 3, column 7: expected ',' or ']'"),
    ("config that gives a key twice", lambda t: [written(t, b"train:\n  epochs: 1\n  epochs: 2\n")],
     r"config file .*bad.yaml is not valid YAML at line 3, column 3: key 'epochs' is given twice "
     r"\(first on line 2\)"),
    ("empty config file", lambda t: [written(t, b"# nothing yet\n")],
     r"config file .*bad.yaml is empty: it holds no settings"),
    ("base that is not a file name", lambda t: [written(t, f"base: [{QUICKSTART}, 7]\n".encode())],
     r"config file .*bad.yaml: base must be a file name or a list of file names, got \['.*', 7\]"),
    ("section given a value", lambda t: [written(t, b"train: 5\n")],
     r"config file .*bad.yaml: train must be a mapping of its settings, not 5; valid keys in "
     r"'train': epochs, batch_size, "),
    ("section given a value on the command line", lambda t: [QUICKSTART, "teacher.hypergrad=5"],
     r"overrides: teacher.hypergrad must be a mapping of its settings, not 5; valid keys in "
     r"'teacher.hypergrad': method, "),
    ("override given two values", lambda t: [QUICKSTART, "optim.lr=0.1", "optim.lr=0.2"],
     r"overrides: optim.lr is given two values \(0.1, then 0.2\); give it once"),
    ("infinite learning rate", lambda t: [QUICKSTART, "optim.lr=inf"],
     r"optim.lr must be a finite number, got inf"),
    ("model option of the wrong type", lambda t: [QUICKSTART, "model.kwargs.hidden=abc"],
     r"model.kwargs.hidden='abc' does not fit model 'mlp': it takes a list of an integer"),
    ("teacher option of the wrong type", lambda t: [QUICKSTART, "teacher.name=meta_weight_net",
                                                    "teacher.kwargs.hidden=abc"],
     r"teacher.kwargs.hidden='abc' does not fit teacher 'meta_weight_net': it takes an integer"),
    ("hypergradient option of the wrong type", lambda t: [
        QUICKSTART, "teacher.name=meta_weight_net", "teacher.hypergrad.method=finite_difference",
        "teacher.hypergrad.options.epsilon=abc"],
     r"teacher.hypergrad.options.epsilon='abc' does not fit hypergradient method "
     r"'finite_difference': it takes a number"),
    *[(f"MNIST with {damage}", lambda t, damage=damage: [QUICKSTART, "data.name=mnist",
                                                         f"data.root={damaged_mnist(t, damage)}"],
       message) for damage, message in [
        ("a truncated image file", r".*/t10k-images-idx3-ubyte is 8000 bytes, but its header describes "
                                   r"20 x 28 x 28 values \(15696 bytes\): the file is truncated"),
        ("a truncated label file", r".*/train-labels-idx1-ubyte is 20 bytes, but its header describes "
                                   r"20 values \(28 bytes\): the file is truncated"),
        ("a bad magic number", r".*/train-images-idx3-ubyte is not an IDX file of 3-dimensional "
                               r"unsigned bytes: it begins 00000903, not 00000803"),
        ("fewer labels than images", r".*/t10k-labels-idx1-ubyte holds 12 labels for the 20 images "
                                     r"of t10k-images-idx3-ubyte: the two files do not belong together"),
    ]],
    ("output folder that is a file", lambda t: [QUICKSTART, f"train.out_dir={written(t, b'')}",
                                                "train.run_name=r"],
     r"cannot make the run folder .*bad.yaml/r \(train.out_dir\): Not a directory"),
    ("output folder that cannot be written", lambda t: [QUICKSTART, "train.out_dir=/sys/metateach",
                                                        "train.run_name=r"],
     r"cannot make the run folder /sys/metateach/r \(train.out_dir\): Operation not permitted "
     r"\(/sys/metateach\)"),
    ("checkpoint without its config", lambda t: [QUICKSTART, *QUICK,
                                                 f"train.resume={crafted(trained_run(t), 'config')}"],
     r"checkpoint .*last.pt is damaged: it has no 'config' \(its experiment\)"),
    ("checkpoint without its running totals", lambda t: [
        QUICKSTART, *QUICK, f"train.resume={crafted(trained_run(t), 'progress.totals')}"],
     r"checkpoint .*last.pt is damaged: its progress record does not fit \(KeyError: 'totals'\)"),
    ("checkpoint of the wrong shape", lambda t: [QUICKSTART, *QUICK,
                                                 f"train.resume={reshaped(trained_run(t))}"],
     r"checkpoint does not fit this run: Error\(s\) in loading state_dict for MLP: size mismatch "
     r"for layers.0.weight: copying a param with shape torch.Size\(\[16, 32\]\) from checkpoint, "
     r"the shape in current model is torch.Size\(\[16, 64\]\).$"),
    ("run name beside a resumed run folder", lambda t: [QUICKSTART, *QUICK, "train.run_name=other",
                                                        f"train.resume={trained_run(t)}"],
     r"train.run_name='other' cannot rename the run that train.resume=.*done continues in its "
     r"folder .*done: drop train.run_name"),
    ("changes allowed without a resume", lambda t: [QUICKSTART, "train.resume_with_changes=[optim.lr]"],
     r"train.resume_with_changes=\['optim.lr'\] changes a resumed run, but train.resume is unset"),
    ("a change that names no setting", lambda t: [QUICKSTART, *QUICK, f"train.resume={trained_run(t)}",
                                                  "train.resume_with_changes=[optim.rate]"],
     r"train.resume_with_changes: 'optim.rate' names no setting \('rate' is not among name, lr, "),
]  # fmt: skip


def written(tmp_path: Path, content: bytes) -> str:
    """A config file holding ``content``."""
    (tmp_path / "bad.yaml").write_bytes(content)
    return str(tmp_path / "bad.yaml")


def damaged_mnist(tmp_path: Path, damage: str) -> Path:
    """A data root holding MNIST's four IDX files (20 blank images each split), one damaged."""
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">4I", 0x803, 20, 28, 28) + bytes(20 * 28 * 28)
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">2I", 0x801, 20) + bytes(range(10)) * 2
        )
    if damage == "a truncated image file":
        file = raw / "t10k-images-idx3-ubyte"
        file.write_bytes(file.read_bytes()[:8000])
    elif damage == "a truncated label file":
        file = raw / "train-labels-idx1-ubyte"
        file.write_bytes(file.read_bytes()[:20])
    elif damage == "a bad magic number":
        file = raw / "train-images-idx3-ubyte"
        file.write_bytes(struct.pack(">I", 0x903) + file.read_bytes()[4:])
    elif damage == "fewer labels than images":
        (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 0x801, 12) + bytes(12))
    else:
        raise AssertionError(damage)
    return tmp_path / "mnist"


def crafted(run: Path, missing: str) -> Path:
    """``run`` with its last checkpoint lacking the entry ``missing`` (dotted for a nested one)."""
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    *parents, key = missing.split(".")
    holder = state
    for part in parents:
        holder = holder[part]
    del holder[key]
    torch.save(state, last)
    return run


def reshaped(run: Path) -> Path:
    """``run`` with the first layer of its last checkpoint's MLP cut to half its inputs."""
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"]["layers.0.weight"] = state["model"]["layers.0.weight"][:, :32].clone()
    torch.save(state, last)
    return run


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
    given = {o.partition("=")[0] for o in overrides}  # the case's own keys win over these
    code = main([config, *[q for q in quiet if q.partition("=")[0] not in given], *overrides])
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
    first = [sys.executable, "tools/train.py", str(CONFIGS / "quickstart.yaml"),
             *layered(KILLABLE, [f"train.out_dir={tmp_path}", "train.run_name=shared", "train.seed=0",
                                 "train.epochs=30"])]  # fmt: skip
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
    assert json.loads((run / "summary.json").read_text())["trainer/steps"] == 600
    assert [r["trainer/epoch"] for r in read_metrics(run) if "trainer/epoch" in r] == list(
        range(1, 31)
    )
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
    argv = [QUICKSTART, *layered(QUICK, [f"train.out_dir={tmp_path / 'runs'}", "train.progress=false",
            "train.epochs=2", f"train.resume={loose}", "train.run_name=continued"])]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in loose.parent.iterdir()) == ["model.pt"]  # nothing beside it
    continued = tmp_path / "runs" / "continued"
    assert [r["trainer/epoch"] for r in read_metrics(continued) if "trainer/epoch" in r] == [2]
    assert main(argv) == 2  # a second loose resume under that name cannot overwrite it


def test_the_unfinished_checkpoint_writes_of_a_killed_run_go_when_it_resumes(
    tmp_path: Path, capsys
) -> None:
    run = trained_run(tmp_path)
    stale = [run / "checkpoints" / f".last.pt.{pid}.tmp" for pid in (4242, 4343)]
    for file in stale:
        file.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    argv = [QUICKSTART, *layered(QUICK, ["train.epochs=2"]), f"train.resume={run}"]
    assert main([*argv, f"train.out_dir={tmp_path}", "train.progress=false"]) == 0
    assert not any(file.exists() for file in stale)
    assert (
        f"removed 2 unfinished checkpoint write(s) of an earlier process from {run}/checkpoints"
        in (capsys.readouterr().err)
    )


def test_a_run_folder_that_turns_read_only_mid_run_stops_in_one_line(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metateach.checkpoint

    written = []

    def refuses_after_the_first(file: Path, mode: str):  # type: ignore[no-untyped-def]
        if written:  # the folder turned read-only after the run's first checkpoint
            raise PermissionError(13, "Permission denied", str(file))
        written.append(file)
        return open(file, mode)  # noqa: SIM115 - the checkpoint writer closes it

    monkeypatch.setattr(metateach.checkpoint, "open", refuses_after_the_first, raising=False)
    argv = [QUICKSTART, *QUICK, f"train.out_dir={tmp_path}", "train.progress=false",
            "train.run_name=r", "train.checkpoint_every_steps=2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: cannot write checkpoint {tmp_path}/r/checkpoints/last.pt: Permission denied "
        "(the previous one is intact)\n"
    )
    assert load_checkpoint(tmp_path / "r")["progress"]["step"] == 0  # the run's first, whole


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"config: x.yaml\nvariants:\n  a: [x\n  b: []\n",
         r"comparison file .*bad.yaml is not valid YAML at line 4, column 4: expected ',' or ']'"),
        (b"config: x.yaml\nvariants: {a: []}\n# \xff\n",
         r"comparison file .*bad.yaml is not UTF-8 text: byte 0xff on line 3"),
        (b"config: x.yaml\nseeds: []\nvariants: {a: []}\n",
         r"comparison file .*bad.yaml: seeds must be a non-empty list of integers, got \[\]"),
        (b"", r"comparison file .*bad.yaml is empty: it holds no settings"),
    ],
    ids=["syntax error", "not UTF-8", "no seeds", "empty"],
)  # fmt: skip
def test_a_bad_comparison_file_ends_in_one_line(
    tmp_path: Path, capsys, content: bytes, message: str
) -> None:
    from metateach.lab.compare_cli import main as compare

    capsys.readouterr()
    assert compare([written(tmp_path, content), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(message, err.removeprefix("error: ")), err


def test_a_run_that_cannot_write_its_first_checkpoint_lets_go_of_its_folder(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metateach.checkpoint
    from metateach.errors import CheckpointError
    from metateach.rundir import RunLock

    def refuses(file: Path, mode: str):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", str(file))

    trainer = Trainer(make_config("train.epochs=1", "train.run_name=r"))
    monkeypatch.setattr(metateach.checkpoint, "open", refuses, raising=False)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*last.pt: Permission denied"
    ):
        trainer.fit()
    RunLock(trainer.run_dir).release()  # the folder's lock was let go: another run may take it
