"""tools/bench.py: the ratios it prints, the JSON line, and the reference it times against."""

from __future__ import annotations

import json

import torch

from metateach.bench import (
    BenchSettings,
    bare_sgd_steps,
    main,
    random_bundle,
    run_bench,
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
        "l2rw_vs_plain",
        "deep_interaction_vs_plain",
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
