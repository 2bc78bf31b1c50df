"""The engine inside the trainer: every method leaves an all-ones student untouched, runs resume, configs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from metateach.config import load_config
from metateach.engine import StudentOnly
from metateach.errors import CheckpointError, ConfigError
from metateach.learning import Learning
from metateach.lesson import Lesson
from metateach.logging import read_metrics
from metateach.registry import STRATEGIES, TEACHERS
from metateach.teacher import Teacher
from metateach.trainer import Trainer

from .conftest import without_measurements, write_cifar100
from .test_trainer import epoch_records

METHODS = [
    ("lookahead", 1, 1),
    ("finite_difference", 1, 1),
    ("implicit", 2, 1),
    ("unrolled", 4, 2),
    ("reversible", 4, 3),
]


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.fit()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize(
    "student",
    [
        ("model.name=mlp", "model.kwargs.hidden=[32]", "model.kwargs.dropout=0.3"),  # dropout draws
        ("model.name=resnet8",),  # BatchNorm running statistics
    ],
    ids=["mlp-dropout", "resnet8-batchnorm"],
)
def test_an_all_ones_teacher_reproduces_plain_training_bit_for_bit(
    make_config, student: tuple[str, ...]
) -> None:
    common = (
        *student,
        "train.epochs=1",
        "data.train_subset=320",
        "noise.type=symmetric",
        "noise.rate=0.2",
    )
    plain = final_state(Trainer(make_config(*common, "train.run_name=plain")))
    for method, k, b in METHODS:
        teacher = (
            "teacher.name=constant",
            f"teacher.hypergrad.method={method}",
            f"teacher.hypergrad.inner_steps={k}",
            f"teacher.hypergrad.backprop_steps={b}",
            "teacher.optim.lr=0.1",
        )
        trainer = Trainer(make_config(*common, *teacher, f"train.run_name={method}"))
        taught = final_state(trainer)
        assert trainer.teaching.teacher.beta.item() != 0.0 or method == "implicit", (
            method
        )  # it did learn
        for key, value in plain.items():
            assert torch.equal(value, taught[key]), f"{method}: {key}"


@pytest.mark.parametrize(
    ("method", "k", "b", "optimizer"),
    [
        ("unrolled", 5, 2, "sgd"),
        ("lookahead", 1, 1, "sgd"),
        # TorchOpt's state (moments and step counts, RMSprop's momentum) through the checkpoint.
        ("unrolled", 5, 2, "adam"),
        ("lookahead", 1, 1, "rmsprop"),
    ],
)
def test_a_run_with_a_learning_teacher_resumes_exactly(
    make_config, method: str, k: int, b: int, optimizer: str
) -> None:
    common = (
        f"optim.name={optimizer}",
        *(["optim.lr=1e-3"] if optimizer != "sgd" else []),
        "train.epochs=2",
        "data.train_subset=400",
        "noise.type=symmetric",
        "noise.rate=0.3",
        "teacher.name=meta_weight_net",
        "teacher.kwargs.hidden=16",
        f"teacher.hypergrad.method={method}",
        f"teacher.hypergrad.inner_steps={k}",
        f"teacher.hypergrad.backprop_steps={b}",
    )
    straight = Trainer(make_config(*common, "train.run_name=straight"))
    expected = straight.fit()
    first = Trainer(make_config(*common, "train.run_name=cut"))
    first.fit(max_steps=9)  # 7 steps an epoch: inside epoch 2, and for unrolled inside a window
    assert first.state.step >= 9 and first.teaching.strategy.can_checkpoint()
    resumed = Trainer(make_config(*common, f"train.resume={first.run_dir}"))
    final = resumed.fit()
    assert without_measurements(final) == without_measurements(expected)
    for a, c in zip(
        straight.teaching.teacher.parameters(), resumed.teaching.teacher.parameters(), strict=True
    ):
        assert torch.equal(a, c)
    assert [without_measurements(r) for r in epoch_records(first.run_dir)] == [
        without_measurements(r) for r in epoch_records(straight.run_dir)
    ]


def test_teacher_metrics_reach_the_log(make_config) -> None:
    trainer = Trainer(
        make_config("teacher.name=meta_weight_net", "teacher.hypergrad.method=reversible",
                    "teacher.hypergrad.inner_steps=4", "teacher.hypergrad.backprop_steps=2", "logging.every_steps=8")
    )  # fmt: skip
    trainer.fit()
    records = read_metrics(trainer.run_dir)
    steps = [r for r in records if "step/train_loss" in r]  # every logging.every_steps steps
    epochs = [r for r in records if "trainer/epoch" in r]
    assert steps and epochs
    for key in ("update_seconds", "graph_mb", "val_loss", "reconstruction_error"):
        assert f"step/teacher/{key}" in steps[0], key  # the means since the last log point
        assert all(f"teacher/{key}" in r for r in epochs), key  # the epoch's means


def test_a_saved_teacher_can_teach_frozen(make_config, tmp_path: Path) -> None:
    trained = Trainer(
        make_config("teacher.name=meta_weight_net", "teacher.kwargs.hidden=8", "train.run_name=t")
    )
    trained.fit()
    frozen = Trainer(
        make_config("teacher.name=meta_weight_net", "teacher.kwargs.hidden=8", "teacher.learn=false",
                    f"teacher.checkpoint={trained.run_dir}", "train.run_name=f")
    )  # fmt: skip
    assert isinstance(frozen.teaching.strategy, StudentOnly) and frozen.teaching.optimizer is None
    for a, c in zip(
        trained.teaching.teacher.parameters(), frozen.teaching.teacher.parameters(), strict=True
    ):
        assert torch.equal(a, c)
    frozen.fit()
    for a, c in zip(
        trained.teaching.teacher.parameters(), frozen.teaching.teacher.parameters(), strict=True
    ):
        assert torch.equal(a, c)  # still unchanged after teaching a whole run
    with pytest.raises(CheckpointError, match=r"does not fit this teacher"):
        Trainer(
            make_config(
                "teacher.name=meta_weight_net",
                "teacher.kwargs.hidden=9",
                f"teacher.checkpoint={trained.run_dir}",
            )
        )
    plain = Trainer(make_config("train.run_name=p"))
    plain.fit()
    with pytest.raises(CheckpointError, match=r"holds no teacher \(teacher.checkpoint\)"):
        Trainer(make_config("teacher.name=meta_weight_net", f"teacher.checkpoint={plain.run_dir}"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=newton"],
         "unknown hypergradient method 'newton' (teacher.hypergrad.method); available: finite_difference, implicit, learned_optimizer, lookahead, reversible, unrolled"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=unrolled", "teacher.hypergrad.inner_steps=2",
          "teacher.hypergrad.backprop_steps=3"],
         "teacher.hypergrad.backprop_steps (B=3) must not exceed teacher.hypergrad.inner_steps (K=2)"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.options.solver=cg"],
         "unknown option 'solver' for hypergradient method 'lookahead' (teacher.hypergrad.options); valid: none"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=implicit", "teacher.hypergrad.options.rtol=1"],
         "unknown option 'rtol' for hypergradient method 'implicit' (teacher.hypergrad.options); valid: solver, iterations, damping, tolerance, alpha"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=reversible", "optim.name=adam"],
         "teacher.hypergrad.method=reversible runs momentum SGD backwards: it needs optim.name=sgd with optim.momentum > 0 and optim.nesterov=false (got optim.name=adam)"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=reversible", "optim.momentum=0"],
         "teacher.hypergrad.method=reversible runs momentum SGD backwards: it needs optim.name=sgd with optim.momentum > 0"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=implicit", "optim.name=adamw"],
         "optim.name=adamw with decoupled weight decay comes to rest elsewhere: set optim.weight_decay=0"),
        (["teacher.name=meta_weight_net", "teacher.kwargs.hidden=abc"],
         "teacher.kwargs.hidden='abc' does not fit teacher 'meta_weight_net': it takes an integer"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.method=finite_difference",
          "teacher.hypergrad.options.epsilon=abc"],
         "teacher.hypergrad.options.epsilon='abc' does not fit hypergradient method 'finite_difference': it takes a number"),
        (["teacher.name=deep_interaction", "teacher.kwargs.features=I0"],
         "teacher.kwargs.features='I0' does not fit teacher 'deep_interaction': it takes a list of"),
        (["optim.nesterov=true", "optim.momentum=0"],
         "optim.name=sgd: Nesterov momentum needs optim.momentum > 0"),
        (["optim.name=rmsprop", "optim.kwargs.rho=0.9"],
         "unknown option 'rho' for optimizer 'rmsprop' (optim.kwargs); valid: alpha, centered"),
        (["teacher.name=meta_weight_net", "teacher.optim.kwargs.alpha=0.9"],
         "unknown option 'alpha' for optimizer 'adam' (teacher.optim.kwargs); valid: eps_root"),
        (["teacher.hypergrad.method=unrolled"],
         "teacher.hypergrad.method is set, but teacher 'none' does not learn by hypergradient"),
        (["teacher.name=meta_weight_net", "teacher.kwargs.depth=2"],
         "unknown option 'depth' for teacher 'meta_weight_net' (teacher.kwargs); valid: hidden"),
        (["teacher.name=meta_weight_net", "teacher.optim.lr=0"], "teacher.optim.lr must be > 0, got 0.0"),
        (["teacher.name=meta_weight_net", "teacher.hypergrad.inner_steps=0"],
         "teacher.hypergrad.inner_steps must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_teacher_settings_are_checked_with_one_line_errors(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_frozen_teacher_ignores_its_learning_settings() -> None:
    cfg = load_config(
        None,
        [
            "teacher.name=meta_weight_net",
            "teacher.learn=false",
            "teacher.hypergrad.method=unrolled",
        ],
    )
    assert cfg.teacher.learn is False


def test_a_teacher_moved_to_another_class_count_starts_its_label_embedding_afresh(
    make_config, tmp_path: Path, skip_cifar_checksums: None
) -> None:
    """Appendix B's transfer to another data set: what depends on the classes is re-initialized,
    with a warning naming it; the rest loads."""
    common = ("teacher.name=deep_interaction", "teacher.hypergrad.inner_steps=2")
    trained = Trainer(make_config(*common, "train.run_name=t", "train.epochs=1"))
    trained.fit()
    write_cifar100(tmp_path, train=300, test=100)
    cifar100 = ("data.name=cifar100", f"data.root={tmp_path}", "data.val_size=100")
    with pytest.warns(UserWarning, match=r"embedding.weight re-initialized, not loaded"):
        moved = Trainer(
            make_config(*common, *cifar100, "teacher.learn=false", "train.run_name=m",
                        f"teacher.checkpoint={trained.run_dir}")
        )  # fmt: skip
    source, target = trained.teaching.teacher, moved.teaching.teacher
    assert (source.embedding.weight.shape[0], target.embedding.weight.shape[0]) == (10, 100)
    assert torch.equal(source.net[-1].weight, target.net[-1].weight)  # W_I, W_M and b load
    assert torch.equal(source.net[-1].bias, target.net[-1].bias)
    surface = (*common, "teacher.kwargs.features=[I0,M1]")
    with_m1 = Trainer(make_config(*surface, "train.run_name=s", "train.epochs=1"))
    with_m1.fit()
    with pytest.raises(CheckpointError, match=r"does not fit this teacher"):  # M1's one-hot width
        Trainer(make_config(*surface, *cifar100, f"teacher.checkpoint={with_m1.run_dir}"))


def test_a_new_kind_of_learning_plugs_in_through_its_declaration(make_config, monkeypatch) -> None:
    """The declaration alone says how its teacher learns: no other module asks which kind it is."""
    monkeypatch.setattr(TEACHERS, "_entries", dict(TEACHERS._entries))
    built: list[int] = []

    @dataclass(frozen=True)
    class ByHand(Learning):
        how: ClassVar[str] = "is stepped by hand"

        def strategy(self, problem, seed):
            built.append(seed)
            return STRATEGIES.get("student_only")(problem)

    @TEACHERS.register("test_by_hand")
    class Scaled(Teacher):
        learns = ByHand()

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, batch, view) -> Lesson:
            return Lesson(weights=self.scale.expand(len(batch.y)))

    trainer = Trainer(make_config("teacher.name=test_by_hand", "train.epochs=1"))
    assert len(built) == 1 and isinstance(trainer.teaching.strategy, StudentOnly)
    assert trainer.teaching.optimizer is not None  # it learns: its parameters get an optimizer
    assert trainer.fit()["test/acc"] > 0.1
    with pytest.raises(
        ConfigError,
        match=r"teacher.hypergrad.method is set, but teacher 'test_by_hand' does not learn by "
        r"hypergradient \(it is stepped by hand\)",
    ):
        make_config("teacher.name=test_by_hand", "teacher.hypergrad.method=unrolled")
