"""The typed configuration: YAML, bases, overrides, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from metateach.config import ExperimentConfig, config_to_dict, load_config
from metateach.errors import ConfigError
from metateach.registry import NOISES

from .conftest import CONFIGS, write_yaml


def test_yaml_fills_typed_sections() -> None:
    cfg = load_config(CONFIGS / "quickstart.yaml")
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.name == "digits"
    assert cfg.noise.type == "symmetric" and cfg.noise.rate == pytest.approx(0.2)
    assert cfg.model.kwargs == {"hidden": [256, 256]}
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.train.epochs, int)
    assert cfg.source == str(CONFIGS / "quickstart.yaml")


def test_overrides_change_any_field_with_its_type() -> None:
    cfg = load_config(
        CONFIGS / "quickstart.yaml",
        [
            "train.epochs=3",
            "optim.lr=1",
            "schedule.milestones=[2,4]",
            "model.kwargs.hidden=[8]",
            "data.root=null",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.milestones == [2, 4]
    assert cfg.model.kwargs["hidden"] == [8]
    assert cfg.data.root is None


def test_base_files_merge_in_order_and_the_file_wins(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    write_yaml(
        tmp_path / "base" / "a.yaml",
        {"optim": {"lr": 0.5, "momentum": 0.5}, "train": {"epochs": 7}},
    )
    write_yaml(tmp_path / "base" / "b.yaml", {"base": "a.yaml", "optim": {"lr": 0.25}})
    child = write_yaml(tmp_path / "exp.yaml", {"base": ["base/b.yaml"], "optim": {"momentum": 0.8}})
    cfg = load_config(child)
    assert cfg.optim.lr == 0.25  # b overrides a
    assert cfg.optim.momentum == 0.8  # the file overrides its bases
    assert cfg.train.epochs == 7  # inherited from a through b


def test_naming_another_teacher_or_model_starts_its_kwargs_afresh(tmp_path: Path) -> None:
    # A paper cell's baseline: the co-teaching options do not reach teacher 'none'.
    cell = CONFIGS / "srit" / "mnist_sym20.yaml"
    assert load_config(cell).teacher.kwargs == {"gradual_epochs": 10}
    baseline = load_config(cell, ["teacher.name=none"])
    assert baseline.teacher.name == "none" and baseline.teacher.kwargs == {}
    assert baseline.optim.sam.rho == 0.05  # everything else stays
    cpu = CONFIGS / "cpu" / "srit_mnist.yaml"
    assert load_config(cpu, ["model.name=lenet"]).model.kwargs == {}
    # Kwargs set beside the new name are kept; the same name keeps merging.
    both = load_config(cpu, ["teacher.name=self_paced", "teacher.kwargs.start=0.5"])
    assert both.teacher.kwargs == {"start": 0.5}
    same = load_config(cpu, ["teacher.name=co_teaching", "teacher.kwargs.forget_rate=auto"])
    assert same.teacher.kwargs == {"gradual_epochs": 5, "forget_rate": "auto"}
    # Between files too: a file naming another teacher does not inherit its base's options.
    write_yaml(
        tmp_path / "a.yaml", {"teacher": {"name": "co_teaching", "kwargs": {"gradual_epochs": 3}}}
    )
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml", "teacher": {"name": "focal"}})
    write_yaml(tmp_path / "c.yaml", {"base": "a.yaml", "teacher": {"kwargs": {"forget_rate": 0.1}}})
    assert load_config(tmp_path / "b.yaml").teacher.kwargs == {}
    assert load_config(tmp_path / "c.yaml").teacher.kwargs == {
        "gradual_epochs": 3,
        "forget_rate": 0.1,
    }


def test_naming_another_teacher_drops_the_old_ones_hypergradient_settings() -> None:
    cell = CONFIGS / "deep_interaction" / "table5_cifar10_uniform40.yaml"
    declared = load_config(cell).teacher.hypergrad
    assert (declared.method, declared.inner_steps, declared.backprop_steps) == ("reversible", 20, 2)
    assert load_config(cell).teacher.loss_average == "mean"
    baseline = load_config(cell, ["teacher.name=none"])  # was an error: 'none' does not learn
    assert baseline.teacher.hypergrad.method is None
    mwn = load_config(cell, ["teacher.name=meta_weight_net"])
    assert (mwn.teacher.hypergrad.method, mwn.teacher.hypergrad.inner_steps) == (None, None)
    assert mwn.teacher.loss_average is None
    # Settings given beside the new name apply; the validation batch size stays.
    both = load_config(cell, ["teacher.name=meta_weight_net", "teacher.hypergrad.inner_steps=5"])
    assert both.teacher.hypergrad.inner_steps == 5
    assert both.teacher.hypergrad.val_batch_size == declared.val_batch_size


def test_paper_base_config_holds_the_deep_interaction_settings() -> None:
    cfg = load_config(CONFIGS / "cifar10_resnet32.yaml")
    assert (cfg.data.name, cfg.data.val_size, cfg.model.name) == ("cifar10", 5000, "resnet32")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.1, 0.9)
    assert (cfg.schedule.name, cfg.schedule.milestones, cfg.schedule.gamma) == (
        "step",
        [80, 120],
        0.1,
    )
    assert (cfg.train.epochs, cfg.train.batch_size) == (300, 128)
    assert load_config(CONFIGS / "cifar100_resnet32.yaml").data.name == "cifar100"


def test_every_shipped_config_loads() -> None:
    # Experiments only: comparisons, suites and sweeps have tests of their own.
    others = {CONFIGS / "compare", CONFIGS / "suites", CONFIGS / "sweeps"}
    files = sorted(f for f in CONFIGS.rglob("*.yaml") if not others & {*f.parents})
    assert len(files) >= 8
    for file in files:
        load_config(file)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown key 'train.epoch'; valid keys in 'train': epochs, batch_size"),
        (["trian.epochs=3"], "unknown key 'trian'; valid keys in the top level: data, noise"),
        (
            ["train.epochs=three"],
            "wrong type for train.epochs: Value 'three' of type 'str' could not be converted to Integer",
        ),
        (["optim.lr=fast"], "wrong type for optim.lr"),
        (["train.progress=maybe"], "wrong type for train.progress"),
        (
            ["data.name=imagenet"],
            "unknown dataset 'imagenet' (data.name); available: cifar10, cifar100, digits, fashion_mnist, imagefolder, mnist, svhn",
        ),
        (["model.name=resnet33"], "unknown model 'resnet33' (model.name); available:"),
        (
            ["noise.type=gaussian"],
            "unknown noise 'gaussian' (noise.type); available: flip2, instance, none, pairflip, symmetric, tridiagonal, uniform",
        ),
        (
            ["teacher.name=oracle"],
            "unknown teacher 'oracle' (teacher.name); available: adaptive_robust_loss, co_teaching, ",
        ),
        (
            ["optim.name=lbfgs"],
            "unknown optimizer 'lbfgs' (optim.name); available: adadelta, adagrad, adam, adamw, rmsprop, sgd",
        ),
        (["train.target_val_acc=1.5"], "train.target_val_acc must be in (0, 1], got 1.5"),
        (["train.stop_at_target=true"], "train.stop_at_target needs train.target_val_acc"),
        (
            ["schedule.name=cyclic"],
            "unknown schedule 'cyclic' (schedule.name); available: constant, cosine, linear, step",
        ),
        (
            ["model.kwargs.depth=3"],
            "unknown option 'depth' for model 'mlp' (model.kwargs); valid: hidden, dropout",
        ),
        (["optim.lr=-0.1"], "optim.lr must be > 0, got -0.1"),
        (["noise.rate=1.0"], "noise.rate must be in [0, 1), got 1.0"),
        (["noise.imbalance_factor=0.5"], "noise.imbalance_factor must be >= 1, got 0.5"),
        (["data.train_subset=0"], "data.train_subset must be >= 1, got 0"),
        (["optim.betas=[0.9]"], "optim.betas must be a pair [beta1, beta2] in [0, 1), got [0.9]"),
        (
            ["noise.type=none", "noise.rate=0.3"],
            "noise.rate=0.3 needs a noise.type to corrupt labels (it is 'none')",
        ),
        (
            ["logging.wandb=cloud"],
            "logging.wandb must be one of offline, online, disabled, got 'cloud'",
        ),
        (["train.device=gpu"], "train.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (["train.epochs"], "override 'train.epochs' must look like key=value"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "quickstart.yaml", overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    bad = write_yaml(tmp_path / "bad.yaml", {"optim": {"learning_rate": 0.1}})
    with pytest.raises(
        ConfigError,
        match=r"config file .*bad.yaml: unknown key 'optim.learning_rate'; valid keys in 'optim': name, lr",
    ):
        load_config(bad)


def test_missing_files_and_bases_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml$"):
        load_config(tmp_path / "nope.yaml")
    child = write_yaml(tmp_path / "child.yaml", {"base": "missing_base.yaml"})
    with pytest.raises(
        ConfigError, match=r"config file not found: .*missing_base.yaml \(base of .*child.yaml\)"
    ):
        load_config(child)


def test_cyclic_bases_and_broken_yaml_are_errors(tmp_path: Path) -> None:
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="builds on itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "broken.yaml").write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML at line \d+"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, not list"):
        load_config(tmp_path / "list.yaml")


def test_config_round_trips_through_a_plain_dict(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "quickstart.yaml", ["train.epochs=4"])
    plain = config_to_dict(cfg)
    assert plain["train"]["epochs"] == 4 and plain["model"]["kwargs"] == {"hidden": [256, 256]}
    saved = write_yaml(
        tmp_path / "resolved.yaml", {k: v for k, v in plain.items() if k != "source"}
    )
    assert config_to_dict(load_config(saved)) == {**plain, "source": str(saved)}


def test_plugins_are_imported_before_names_are_looked_up(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The plugin registers into a copy of the registry, so other tests see the shipped names only.
    monkeypatch.setattr(NOISES, "_entries", dict(NOISES._entries))
    (tmp_path / "extra_noise.py").write_text(
        "import torch\n"
        "from metateach.registry import NOISES\n\n"
        "@NOISES.register('all_to_zero')\n"
        "def all_to_zero(labels, num_classes, rate, generator, images):\n"
        "    rows = torch.zeros(len(labels), num_classes, dtype=torch.float64)\n"
        "    rows[:, 0] = 1.0\n"
        "    return rows\n"
    )
    cfg = load_config(
        CONFIGS / "quickstart.yaml", ["plugins=[extra_noise.py]", "noise.type=all_to_zero"]
    )
    assert cfg.plugins == ["extra_noise.py"]
    again = load_config(
        CONFIGS / "quickstart.yaml", ["plugins=[extra_noise.py]", "noise.type=all_to_zero"]
    )
    assert again.noise.type == "all_to_zero"  # a second load does not register twice


def test_broken_plugins_are_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"plugin file not found: missing.py \(plugins\)"):
        load_config(None, ["plugins=[missing.py]"])
    with pytest.raises(
        ConfigError,
        match=r"plugin 'no_such_module' \(plugins\) failed: ModuleNotFoundError: No module named 'no_such_module'",
    ):
        load_config(None, ["plugins=[no_such_module]"])
    (tmp_path / "broken.py").write_text("raise RuntimeError('half written')\n")
    with pytest.raises(
        ConfigError, match=r"plugin 'broken.py' \(plugins\) failed: RuntimeError: half written"
    ):
        load_config(None, ["plugins=[broken.py]"])


def test_paper_cell_configs_hold_their_tables_settings() -> None:
    table1 = load_config(CONFIGS / "deep_interaction" / "table1_cifar100_wrn28_10.yaml")
    assert (
        table1.data.name,
        table1.model.name,
        table1.train.epochs,
        table1.schedule.milestones,
    ) == ("cifar100", "wrn28_10", 300, [80, 120])
    assert (
        table1.teacher.name,
        table1.teacher.hypergrad.inner_steps,
        table1.teacher.hypergrad.backprop_steps,
    ) == ("deep_interaction", 20, 2)
    table5 = load_config(CONFIGS / "deep_interaction" / "table5_cifar10_uniform60.yaml")
    assert (table5.noise.type, table5.noise.rate, table5.model.name) == ("uniform", 0.6, "wrn28_10")
    assert (
        table5.train.epochs,
        table5.schedule.milestones,
        table5.train.batch_size,
        table5.data.val_size,
    ) == (40, [36, 38], 100, 1000)
    table6 = load_config(CONFIGS / "deep_interaction" / "table6_cifar100_flip20.yaml")
    assert (
        table6.noise.type,
        table6.noise.rate,
        table6.model.name,
        table6.schedule.milestones,
    ) == ("flip2", 0.2, "resnet32", [40, 50])
    mwnet = load_config(CONFIGS / "meta_weight_net" / "cifar10_imbalance100_resnet32.yaml")
    assert (
        mwnet.noise.imbalance_factor,
        mwnet.data.val_size,
        mwnet.teacher.optim.lr,
        mwnet.optim.nesterov,
    ) == (100.0, 100, 1e-5, True)
    # Algorithm 1 on Eq. 2's plain momentum, even on Meta-Weight-Net's (Nesterov) schedule.
    for cell in (table1, table5, table6):
        assert (cell.teacher.hypergrad.method, cell.optim.nesterov) == ("reversible", False)
        assert (cell.teacher.hypergrad.val_batch_size, cell.teacher.loss_average) == ("all", "mean")
    flip = load_config(CONFIGS / "meta_weight_net" / "cifar10_flip20_resnet32.yaml")
    uniform = load_config(CONFIGS / "meta_weight_net" / "cifar10_uniform40_wrn28_10.yaml")
    assert flip.optim.nesterov
    # The teacher as each of the authors' scripts runs it: MW-Net.py for the flip cells, the
    # first release for the uniform cells, the class-imbalance code for the long tails.
    assert (flip.teacher.kwargs["normalize"], flip.teacher.optim.name) == (False, "adam")
    assert (flip.teacher.optim.lr, flip.teacher.optim.weight_decay) == (1e-3, 1e-4)
    assert (uniform.teacher.kwargs["normalize"], uniform.teacher.optim.name) == (True, "sgd")
    assert (uniform.teacher.optim.lr, uniform.teacher.optim.nesterov) == (1e-3, True)
    assert (mwnet.teacher.kwargs["normalize"], mwnet.teacher.optim.name) == (True, "sgd")
    tables = {
        t: len(list((CONFIGS / "deep_interaction").glob(f"table{t}_*.yaml"))) for t in range(1, 8)
    }
    assert tables == {1: 9, 2: 6, 3: 4, 4: 3, 5: 4, 6: 4, 7: 5}  # table 1: 6 cells, 3 L2T baselines
    assert len(list((CONFIGS / "meta_weight_net").glob("*.yaml"))) == 20


def test_l2t_dln_tables_are_the_slides_settings() -> None:
    """L2T-DLN's noisy-label table is flip-to-two noise on ResNet-32 (the deep-interaction
    paper's Table 6 setting), its "L2R [2]" row the deep-interaction teacher; the teaching
    lengths are the slides' (L2T-DLN 25, L2T-DLF 1); the CPU configs say they keep 15."""
    from metateach.lab.compare import load_comparison

    noisy = load_comparison(CONFIGS / "compare" / "paper" / "l2t_dln_noisy.yaml")
    teachers = {"": "l2t_dln", "_ce": "none", "_mentornet": "mentornet_pd"}
    teachers |= {"_meta_weight_net": "meta_weight_net", "_deep_interaction": "deep_interaction"}
    cells = {f"{d}_flip{p}": (d, p / 100) for d in ("cifar10", "cifar100") for p in (20, 40)}
    assert set(noisy.variants) == {cell + row for cell in cells for row in teachers}
    assert noisy.paper["cifar10_flip40"] == 89.39 and noisy.paper["cifar100_flip20_ce"] == 50.86
    assert noisy.paper["cifar10_flip20_deep_interaction"] == 91.05
    for cell, (data, rate) in cells.items():
        for row, teacher in teachers.items():
            variant = cell + row
            cfg = load_config(noisy.config_of(variant), noisy.variants[variant])
            assert (cfg.data.name, cfg.noise.type, cfg.noise.rate) == (data, "flip2", rate)
            assert (cfg.model.name, cfg.train.epochs, cfg.teacher.name) == ("resnet32", 60, teacher)
            if teacher == "l2t_dln":
                assert (
                    cfg.teacher.hypergrad.inner_steps == cfg.teacher.hypergrad.backprop_steps == 25
                )
    assert not list((CONFIGS / "l2t_dln").glob("*uniform*"))
    table1 = load_comparison(CONFIGS / "compare" / "paper" / "l2t_dln.yaml")
    for variant, overrides in table1.variants.items():
        cfg = load_config(table1.config_of(variant), overrides)
        length = {"l2t_dln": 25, "l2t_dlf": 1}.get(cfg.teacher.name)
        if length is not None:
            assert (
                cfg.teacher.hypergrad.inner_steps == cfg.teacher.hypergrad.backprop_steps == length
            )
    assert "cifar100_resnet32" in table1.variants
    for cpu in ("dln_mnist", "dln_cifar10_jpeg"):
        assert load_config(CONFIGS / "cpu" / f"{cpu}.yaml").teacher.hypergrad.inner_steps == 15


def test_l2t_students_learn_by_mini_batch_sgd_in_the_paper_configs() -> None:
    """The slides' student learning rule; the CPU configs keep the Adam of their reported runs."""
    for name in ("mnist_mlp_teacher", "mnist_mlp_student", "mnist_mlp_to_lenet_student"):
        optim = load_config(CONFIGS / "l2t" / f"{name}.yaml").optim
        assert (optim.name, optim.momentum) == ("sgd", 0.0)
    for name in ("l2t_mnist_teacher", "l2t_mnist_student"):
        assert load_config(CONFIGS / "cpu" / f"{name}.yaml").optim.name == "adam"
