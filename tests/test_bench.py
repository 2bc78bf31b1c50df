"""tools/bench.py: the ratios it prints, the JSON line, and the reference it times against."""

from __future__ import annotations

import json

import torch

from metateach.lab.bench import (
    BenchSettings,
    _teaching_step,
    bare_sgd_steps,
    higher_lookahead_step,
    main,
    random_bundle,
    run_bench,
    teacher_step_memory,
    torch_optimizer,
    trainer_for,
)

TINY = ["--model", "mlp", "--model-kwargs", "{hidden: [16]}", "--image-shape", "1", "8", "8",
        "--batch-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1"]  # fmt: skip


def test_the_bench_prints_a_table_and_ends_with_a_json_line_of_ratios(capsys) -> None:
    assert main([*TINY, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert set(figures) == {
        "plain_step_ms",
        "framework_overhead",
        "lookahead_vs_plain",
        "lookahead_adamw_vs_plain",
        "l2rw_vs_plain",
        "loss_fn_lookahead_vs_plain",
        "deep_interaction_vs_plain",
        "dln_vs_plain",
        "co_teaching_vs_plain",
        "srit_vs_plain",
        "l2t_vs_plain",
        "ours_vs_higher_lookahead",
        "reversible_memory_b20_vs_b1",
        "reversible_memory_b20_vs_b2",
        "unrolled_memory_b20_vs_b1",
        "unrolled_memory_b20_vs_b2",
    }
    assert all(v > 0 for v in figures.values())
    # Each figure has its row in the table.
    for key in figures:
        assert any(line.startswith(key) for line in lines[1:-1])


def test_keys_pick_the_teaching_steps_timed() -> None:
    settings = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8, 1, 1, 1)
    assert set(run_bench(settings, ["l2rw_vs_plain"])) == {
        "plain_step_ms", "framework_overhead", "l2rw_vs_plain"
    }  # fmt: skip


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
    # on, reversible holds one step's at a time and unrolled all of them.
    assert 0 < reversible[1] < reversible[2]
    assert reversible[3] == reversible[2] == reversible[20]
    assert 0 < unrolled[1] < unrolled[2]
    assert unrolled[20] / unrolled[2] > 5


def test_profile_prints_where_a_teaching_step_spends_its_time(capsys) -> None:
    assert main([*TINY, "--profile", "lookahead_vs_plain"]) == 0
    out = capsys.readouterr().out
    assert "Self CPU" in out and "aten::" in out
