"""Data-parallel training: torchrun's processes end where one process ends, up to float rounding."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metateach.checkpoint import load_checkpoint
from metateach.config import load_config
from metateach.data import BatchLoader, Split
from metateach.data.transforms import Normalize
from metateach.distributed import World, check_data_parallel, from_main
from metateach.errors import ConfigError
from metateach.teaching import build_teaching
from metateach.trainer import Trainer

from .conftest import CONFIGS, REPO, kill_once_checkpointed, layered, without_measurements

#: Two processes sum two halves of each batch's gradient where one process takes the
#: whole batch in one kernel: float32 rounding, compounded over 40 steps, stays below this.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)

#: Two epochs of the quickstart's digits (20 batches of 64 an epoch, the last one of 41,
#: split 21/20), a small MLP, one thread per process.
COMMON = ["train.epochs=2", "model.kwargs.hidden=[32]", "train.threads=1", "logging.wandb=disabled",
          "logging.plots=false", "train.progress=false"]  # fmt: skip


#: The deep-interaction teacher, a teacher step every 10 steps through the last 3. It steps by
#: SGD: its output bias gets a gradient near zero, which Adam would blow up from rounding noise
#: to steps of its full learning rate.
DEEP_INTERACTION = ["teacher.name=deep_interaction", "teacher.hypergrad.inner_steps=10",
                    "teacher.hypergrad.backprop_steps=3", "teacher.hypergrad.val_batch_size=50",
                    "teacher.optim.name=sgd", "teacher.optim.lr=1"]  # fmt: skip


def torchrun_command(tmp_path: Path, *overrides: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node=2 tools/train.py`` on the quickstart."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "tools/train.py", str(CONFIGS / "quickstart.yaml"),
        *layered(COMMON, [*overrides, f"train.out_dir={tmp_path}"]),
    ]  # fmt: skip


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(tmp_path: Path, name: str, *overrides: str) -> Path:
    """Run :func:`torchrun_command` to the end in the run folder ``name``; return the folder."""
    done = subprocess.run(
        torchrun_command(tmp_path, *overrides, f"train.run_name={name}"),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("test accuracy:") == 1  # rank 0 alone reports
    return tmp_path / name


def one_process(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(
        CONFIGS / "quickstart.yaml",
        [*COMMON, *overrides, f"train.out_dir={tmp_path}", "train.run_name=single"],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def assert_same_weights(saved: dict, module: torch.nn.Module) -> None:
    expected = module.state_dict()
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(
            saved[key], value, **TOLERANCE, msg=lambda m, key=key: f"{key}: {m}"
        )


#: What two processes must reproduce, by name: the overrides of each run.
CASES = {
    "plain": ["teacher.name=none"],
    # One-step lookahead (Meta-Weight-Net's weights as given; deep_interaction's below are
    # normalized over the global batch).
    "meta_weight_net": ["teacher.name=meta_weight_net", "teacher.hypergrad.val_batch_size=50"],
    # Unrolled: K = 10, B = 3 (four teacher steps), so a differentiated step's gradient is
    # summed inside the graph and the window's first step goes through forward mode.
    "deep_interaction": DEEP_INTERACTION,
    # The same hypergradient by reversing momentum SGD: shares of each step's direction
    # (the weight decay in rank 0's: a strong one, to be seen), adjoints summed.
    "reversible": [*DEEP_INTERACTION, "teacher.hypergrad.method=reversible",
                   "optim.weight_decay=0.05"],
    # SRIT: co-teaching's two networks with SAM. Keeping every sample (forget rate 0) makes
    # the per-process selections the single process's; both networks' steps, and SAM's
    # perturbation, take the summed gradient.
    "srit": ["teacher.name=co_teaching", "teacher.kwargs.forget_rate=0", "optim.sam.rho=0.05"],
    # The same around TorchOpt's Adam (co-teaching's own optimizer).
    "srit_adam": ["teacher.name=co_teaching", "teacher.kwargs.forget_rate=0", "optim.sam.rho=0.05",
                  "optim.name=adam", "optim.lr=1e-3"],
    # L2T-DLN: the LSTM reads the summed d e / d phi of each round of 5 steps (2 of them
    # differentiated) and steps on psi's summed gradient every 2 rounds.
    "l2t_dln": ["teacher.name=l2t_dln", "teacher.kwargs.init_steps=20",
                "teacher.hypergrad.inner_steps=5", "teacher.hypergrad.backprop_steps=2",
                "teacher.hypergrad.options={rounds: 2}", "teacher.hypergrad.val_batch_size=50",
                "teacher.optim.name=sgd", "teacher.optim.lr=0.1"],
    # The same two with an adaptive student: AdamW under one-step lookahead, Adam under
    # unrolled windows (its moments carried through the graph, summed gradients inside).
    # The teacher steps by SGD, as DEEP_INTERACTION's does: under the AdamW student one of
    # Meta-Weight-Net's weights gets a hypergradient near zero, which the teacher's Adam
    # turned into a step of 2e-4 in one process and not the other.
    "meta_weight_net_adamw": ["teacher.name=meta_weight_net", "teacher.hypergrad.val_batch_size=50",
                              "teacher.optim.name=sgd", "teacher.optim.lr=1",
                              "optim.name=adamw", "optim.lr=1e-3"],
    "deep_interaction_adam": [*DEEP_INTERACTION, "teacher.hypergrad.method=unrolled",
                              "optim.name=adam", "optim.lr=1e-3"],
    # Implicit differentiation: conjugate gradient on summed Hessian-vector products (a
    # strong weight decay, in rank 0's share alone). Damped: ten undamped CG steps on this
    # Hessian, far from an optimum and indefinite, amplify the rounding difference of a sum
    # over two processes to 5e-4 in the student's weights (two steps, or damping, agree).
    "implicit": ["teacher.name=meta_weight_net", "teacher.hypergrad.method=implicit",
                 "teacher.hypergrad.val_batch_size=50", "optim.weight_decay=0.05",
                 "teacher.hypergrad.options={damping: 1.0}"],
}  # fmt: skip


@pytest.mark.parametrize("teacher", CASES.values(), ids=CASES.keys())
def test_two_processes_end_with_the_weights_of_one(tmp_path: Path, teacher: list[str]) -> None:
    run = torchrun(tmp_path, "two", *teacher)
    single = one_process(tmp_path, *teacher)
    saved = load_checkpoint(run)
    assert_same_weights(saved["model"], single.model)
    if single.teaching.teacher is not None:
        assert_same_weights(saved["teacher"], single.teaching.teacher)
        # The teacher moved: the comparison is not of two untouched initializations.
        initial = Trainer(load_config(CONFIGS / "quickstart.yaml", [*COMMON, *teacher,
                          f"train.out_dir={tmp_path}", "train.run_name=initial"]))  # fmt: skip
        moved = [
            not torch.allclose(a, b)
            for a, b in zip(
                initial.teaching.teacher.state_dict().values(),
                single.teaching.teacher.state_dict().values(),
                strict=True,
            )
        ]
        assert any(moved)
    # Rank 0 alone wrote the run folder; its numbers are the global batch's.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    progress = saved["progress"]
    assert progress["step"] == single.state.step == 40
    assert progress["learned"] == single.state.learned == 2 * 1257
    final, expected = progress["history"][-1], single.state.history[-1]
    for key in ("train/loss", "val/acc", "test/acc", "val/loss"):
        assert final[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-4), key
    assert len(saved["rng"]["ranks"]) == 2  # each rank's random state, to resume exactly


def test_co_teachings_noise_rate_estimate_reads_every_process_losses(tmp_path: Path) -> None:
    # The first epoch keeps every sample (tau starts at 0), so both runs see the same losses;
    # the estimate made from them at the second epoch's start must be the same.
    auto = ["teacher.name=co_teaching", "teacher.kwargs.forget_rate=auto"]
    saved = load_checkpoint(torchrun(tmp_path, "two", *auto))["teacher"]
    single = one_process(tmp_path, *auto).teaching.teacher
    assert 0 < float(single.forget_rate) < 1
    torch.testing.assert_close(saved["forget_rate"], single.forget_rate, rtol=1e-4, atol=0)


def test_two_processes_killed_mid_run_resume_exactly(tmp_path: Path) -> None:
    # Dropout draws differ by rank, so this also checks that each rank's random state comes back.
    longer = ["train.epochs=6", "model.kwargs.dropout=0.2", "train.checkpoint_every_steps=7",
              "teacher.name=meta_weight_net", "teacher.hypergrad.val_batch_size=50"]  # fmt: skip
    straight = torchrun(tmp_path, "straight", *longer)
    agent = subprocess.Popen(
        torchrun_command(tmp_path, *longer, "train.run_name=cut"), cwd=REPO, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    # The agent and both workers at once.
    cut = kill_once_checkpointed(agent, tmp_path / "cut", past_step=20)
    time.sleep(1)  # nothing is left running: the folder stays as the kill left it
    assert load_checkpoint(last)["progress"]["step"] == cut
    assert 20 < cut < 120 and not (tmp_path / "cut" / "summary.json").exists()
    torchrun(tmp_path, "cut", *longer, f"train.resume={tmp_path / 'cut'}")  # on in its folder
    resumed, expected = load_checkpoint(last), load_checkpoint(straight)
    for part in ("model", "teacher"):
        for key, value in expected[part].items():
            assert torch.equal(resumed[part][key], value), (part, key)
    assert [without_measurements(r) for r in resumed["progress"]["history"]] == [
        without_measurements(r) for r in expected["progress"]["history"]
    ]


def test_each_rank_takes_its_part_of_the_global_batch_with_the_whole_batchs_augmentation() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (45, 3, 8, 8), dtype=torch.uint8, generator=generator)
    targets = torch.arange(45) % 10
    split = Split(images, targets, targets, torch.arange(45))
    normalize = Normalize(torch.full((3,), 0.5), torch.full((3,), 0.25))

    def loader(shard: tuple[int, int]) -> BatchLoader:
        return BatchLoader(split, 16, normalize, shuffle=True, crop_padding=2, flip=True,
                           seed=3, shard=shard)  # fmt: skip

    whole = list(loader((0, 1)).epoch(1))
    parts = [list(loader((rank, 3)).epoch(1)) for rank in range(3)]
    assert [loader((0, 3)).global_size(b) for b in range(3)] == [16, 16, 13]
    for b, batch in enumerate(whole):
        shards = [p[b] for p in parts]
        assert [len(s.y) for s in shards] == ([6, 5, 5] if b < 2 else [5, 4, 4])
        for field in range(3):
            assert torch.equal(torch.cat([s[field] for s in shards]), batch[field])


def test_a_teacher_that_cannot_run_data_parallel_is_refused(make_config) -> None:
    cfg = make_config("teacher.name=l2t", "train.target_val_acc=0.9")
    trainer_parts = Trainer(make_config("teacher.name=none"))
    teaching = build_teaching(
        cfg, trainer_parts.model, trainer_parts.optimizer, trainer_parts.data, torch.device("cpu")
    )
    with pytest.raises(
        ConfigError,
        match=r"teacher 'l2t' \(Reinforce, teacher.hypergrad.method=None\) does not run "
        "data-parallel yet: run it in one process",
    ):
        check_data_parallel(cfg, teaching.strategy, World(0, 2))
    plain = make_config("teacher.name=none", "train.batch_size=1")
    with pytest.raises(
        ConfigError, match=r"train.batch_size=1 is the global batch and cannot be split over 2"
    ):
        check_data_parallel(plain, trainer_parts.teaching.strategy, World(0, 2))


def test_one_process_is_its_own_main() -> None:
    world = World()
    assert world.main and world.shard == (0, 1)
    assert from_main(world, lambda: 7) == 7


def test_a_diverged_pair_saves_the_state_before_the_failing_step(tmp_path: Path) -> None:
    # Both ranks replay from the checkpoint at the start and pause before the step that failed.
    done = subprocess.run(
        torchrun_command(tmp_path, "teacher.name=meta_weight_net", "optim.lr=1e10",
                         "train.epochs=1", "train.run_name=diverged"),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    found = re.search(r"error: the training loss became non-finite at step (\d+) ", done.stderr)
    assert found, done.stderr[-3000:]
    run = tmp_path / "diverged" / "checkpoints"
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == int(found.group(1)) - 1
    assert load_checkpoint(run / "step0.pt")["progress"]["step"] == 0
