"""tools/bench.py: the ratios it prints, the JSON line, and the reference it times against."""

from __future__ import annotations

import json

import pytest
import torch

from metateach.lab import bench
from metateach.lab.bench import (
    FLOORS,
    SUBJECTS,
    BenchSettings,
    _teaching_step,
    bare_sgd_steps,
    higher_lookahead_step,
    main,
    paired_ratios,
    random_bundle,
    run_bench,
    summarize,
    teacher_step_memory,
    torch_optimizer,
    trainer_for,
)

TINY = ["--model", "mlp", "--model-kwargs", "{hidden: [16]}", "--image-shape", "1", "8", "8",
        "--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1"]  # fmt: skip


#: The quickstart cut short, for ``logging_overhead`` in tests.
SHORT_QUICKSTART = ["train.epochs=1", "data.train_subset=200", "logging.diagnostic_samples=100"]


def test_the_bench_prints_a_table_and_ends_with_a_json_line_of_ratios(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whole quickstart runs are timed by a test of their own (marked slow).
    monkeypatch.setattr(bench, "logging_overhead", lambda overrides: [1.02, 1.01, 1.04])
    assert main([*TINY, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) == {
        "plain_step_ms",
        "framework_overhead",
        "python_overhead",
        "lookahead_vs_plain",
        "lookahead_adamw_vs_plain",
        "l2rw_vs_plain",
        "loss_fn_lookahead_vs_plain",
        "deep_interaction_vs_plain",
        "deep_interaction_reversible_vs_plain",
        "dln_vs_plain",
        "co_teaching_vs_plain",
        "srit_vs_plain",
        "l2t_vs_plain",
        "ours_vs_higher_lookahead",
        "reversible_memory_b20_vs_b1",
        "reversible_memory_b20_vs_b2",
        "unrolled_memory_b20_vs_b1",
        "unrolled_memory_b20_vs_b2",
        "wandb_logging_overhead",
        "wandb_logging_overhead_taught",
    }
    assert all(f["value"] > 0 for k, f in figures.items() if k != "python_overhead")
    assert 0 <= figures["python_overhead"]["value"] < 1
    # Every timed ratio carries its spread; every teaching step its counted floor.
    for key, figure in figures.items():
        timed = key.endswith("_vs_plain") or key in (
            "framework_overhead",
            "ours_vs_higher_lookahead",
            "wandb_logging_overhead",
            "wandb_logging_overhead_taught",
        )
        assert (figure["iqr"] is not None) == timed, key
        if figure["iqr"] is not None:
            assert figure["iqr"][0] <= figure["value"] <= figure["iqr"][1], key
        if key.endswith("_vs_plain"):
            assert figure["floor"] == FLOORS[key][0] >= 1, key
    # Each figure has its row in the table.
    for key in figures:
        assert any(line.startswith(key) for line in lines[1:-1])


def test_each_teaching_step_runs_the_method_its_key_names() -> None:
    # deep_interaction_vs_plain once timed reversible, the teacher's default, under its
    # unrolled name.
    settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8)
    data = random_bundle(16, 16, (1, 8, 8), 10)
    methods = {
        "lookahead_vs_plain": "Lookahead",
        "l2rw_vs_plain": "ExampleGradients",
        "loss_fn_lookahead_vs_plain": "Lookahead",
        "deep_interaction_vs_plain": "Unrolled",
        "deep_interaction_reversible_vs_plain": "Reversible",
        "dln_vs_plain": "LearnedOptimizer",
    }
    for key, method in methods.items():
        strategy = trainer_for(settings, SUBJECTS[key][0], data).teaching.strategy
        assert type(strategy).__name__ == method, key


def test_the_bench_leaves_no_run_folders_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8)
    trainer = trainer_for(settings, ["teacher.name=none"], random_bundle(16, 16, (1, 8, 8), 10))
    assert not (tmp_path / "runs").exists()
    assert trainer.run_dir.parent.name.startswith("metateach-bench-")


def test_pairs_alternate_their_order_and_the_figure_is_the_median_ratio() -> None:
    calls: list[str] = []
    settings = BenchSettings("mlp", "{}", (1, 8, 8), 10, 8, steps=1, repeats=3, warmup=0)
    ratios, reference = paired_ratios(
        lambda: calls.append("A"), lambda: calls.append("B"), settings
    )
    assert calls == ["A", "B", "B", "A", "A", "B"]  # AB, BA, AB: a drift falls on both
    assert len(ratios) == 3 and all(r > 0 for r in ratios) and reference > 0
    figure = summarize([1.0, 4.0, 2.0, 3.0], floor=1.5)
    assert figure.value == 2.5 and figure.iqr == (1.75, 3.25) and figure.floor == 1.5


def test_the_bench_refuses_a_gpu_it_does_not_have(capsys) -> None:
    if torch.cuda.is_available():  # there, --device cuda runs: the code path this machine lacks
        settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8, 1, 2, 1, "cuda")
        assert run_bench(settings, ["l2rw_vs_plain"])["l2rw_vs_plain"].value > 0
        return
    assert main([*TINY, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == (
        "error: --device cuda: CUDA is not available here; use --device cpu\n"
    )


def test_keys_pick_the_teaching_steps_timed() -> None:
    settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8, 1, 1, 1)
    assert set(run_bench(settings, ["l2rw_vs_plain"])) == {
        "plain_step_ms", "framework_overhead", "l2rw_vs_plain"
    }  # fmt: skip
    trainer = trainer_for(settings, [], random_bundle(8, 8, (1, 8, 8), 10))
    assert trainer.cfg.train.device == "cpu"  # the bench's device is the trainer's


def test_the_bare_reference_learns_as_the_trainers_plain_step_does() -> None:
    """The reference and the trainer's plain step take the same SGD step on the same batch."""
    settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8)
    data = random_bundle(32, 16, (1, 8, 8), 10)
    trainer = trainer_for(settings, ["teacher.name=none", "optim.weight_decay=0"], data)
    batch = next(iter(trainer.train_loader.epoch(0)))
    copy = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(batch)
    after_trainer = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.model.load_state_dict(copy)
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.1, momentum=0.9)
    bare_sgd_steps(trainer.model, optimizer, [(batch.x, batch.y)])
    for a, b in zip(after_trainer, trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_higher_reference_computes_our_meta_weight_net_iteration() -> None:
    """ours_vs_higher_lookahead times two codes of one computation: same student, same teacher after."""
    settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8)
    data = random_bundle(32, 16, (1, 8, 8), 10)
    overrides = ["teacher.name=meta_weight_net", "teacher.optim.name=sgd", "teacher.optim.lr=10"]
    ours, theirs = trainer_for(settings, overrides, data), trainer_for(settings, overrides, data)
    teachers = [t.teaching.teacher for t in (ours, theirs)]
    before = [p.detach().clone() for p in teachers[0].parameters()]
    for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        assert torch.equal(a, b)  # the same start
    optimizer = torch_optimizer(theirs)
    for ours_batch, their_batch in zip(
        ours.train_loader.epoch(0), theirs.train_loader.epoch(0), strict=True
    ):
        _teaching_step(ours, ours_batch)
        higher_lookahead_step(theirs, their_batch, optimizer)
    moved = sum(
        float((a.detach() - b).abs().sum())
        for a, b in zip(teachers[0].parameters(), before, strict=True)
    )
    assert moved > 1e-3  # the teacher learned, so agreeing says something
    for a, b in zip(teachers[0].parameters(), teachers[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reversible_memory_stays_flat_in_b_while_unrolled_grows() -> None:
    settings = BenchSettings("mlp", "{hidden: [64, 64]}", (1, 8, 8), 10, 16)
    reversible = {b: teacher_step_memory(settings, "reversible", b) for b in (1, 2, 3, 20)}
    unrolled = {b: teacher_step_memory(settings, "unrolled", b) for b in (1, 2, 20)}
    # B = 1 holds no second-order graph (its one step is taken in forward mode); from B = 2
    # on, reversible holds one step's at a time and unrolled all of them. Reversible's last
    # step keeps its real pass's graph and the others are replayed: the same graph, to the
    # storages of a few constants (B = 2 replays none; from B = 3 on, the peak is the same).
    assert 0 < reversible[1] < reversible[2]
    assert reversible[3] == pytest.approx(reversible[2], rel=0.01)
    assert reversible[20] == reversible[3]
    assert 0 < unrolled[1] < unrolled[2]
    assert unrolled[20] / unrolled[2] > 5


def test_profile_prints_where_a_teaching_step_spends_its_time(capsys) -> None:
    assert main([*TINY, "--profile", "lookahead_vs_plain"]) == 0
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out


@pytest.mark.slow
def test_the_logging_overhead_times_quickstart_runs_with_wandb_and_without(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(bench, "_scratch_dir", lambda: str(tmp_path))
    ratios = bench.logging_overhead(pairs=1, overrides=SHORT_QUICKSTART)
    assert len(ratios) == 1 and ratios[0] > 0
    # Two runs of each (one to warm up): those with W&B wrote an offline run, the others none.
    runs = sorted(tmp_path.glob("quickstart-*"))
    with_wandb = [r for r in runs if (r / "wandb").is_dir()]
    assert len(runs) == 4 and len(with_wandb) == 2


def test_phases_prints_a_teaching_steps_phases_in_plain_steps_beside_its_floor(capsys) -> None:
    assert main([*TINY, "--phases", "deep_interaction_reversible_vs_plain"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:24].strip(): line[24:].split() for line in lines[2:-2]}
    assert rows["plain step"][0] == "18" and rows["window step"][0] == "2"
    assert {"validation", "tangent pass", "window backward", "the rest (in no phase)"} <= set(rows)
    # Every row's units are three times its plain steps; the rows add up to the total.
    for name, cells in rows.items():
        steps, units = float(cells[-2]), float(cells[-1])
        assert units == pytest.approx(3 * steps, abs=0.1), name
    total = float(lines[-2].split()[2])  # in plain steps
    assert sum(float(cells[-2]) for cells in rows.values()) == pytest.approx(total, abs=0.05)
    assert lines[-1].startswith(f"floor {FLOORS['deep_interaction_reversible_vs_plain'][0]:.3f}")
