"""metateach.engine.phases: each phase's own time, and the phases each method's span runs."""

from __future__ import annotations

import pytest

from metateach.engine.phases import PhaseClock, phase, timed
from metateach.lab.bench import SUBJECTS, BenchSettings, _teaching_step, random_bundle, trainer_for


def test_a_phase_inside_another_counts_for_itself_not_for_its_parent() -> None:
    ticks = iter([0.0, 1.0, 3.0, 4.0, 10.0, 10.5])  # the fake clock's readings, in order

    @timed("inner")
    def inner() -> None:
        pass

    with PhaseClock(timer=lambda: next(ticks)) as clock:
        with phase("outer"):  # enters at 0
            with phase("inner"):  # 1 to 3
                pass
            assert clock.calls == {"inner": 1}  # outer again from 3 to 4
        inner()  # 10 to 10.5
    assert clock.seconds == {"outer": 2.0, "inner": 2.5}
    assert clock.calls == {"outer": 1, "inner": 2}


def test_phases_cost_nothing_without_a_clock_and_clocks_do_not_nest() -> None:
    synced: list[int] = []
    with phase("alone"):  # no clock: nothing is timed, nothing fails
        pass
    with PhaseClock(sync=lambda: synced.append(1)) as clock, phase("timed"):
        second = PhaseClock()
        with pytest.raises(RuntimeError, match="already running"):
            second.__enter__()
    assert dict(clock.calls) == {"timed": 1} and len(synced) == 2  # synced at entry and exit
    with PhaseClock() as after:  # the first clock stopped; a new one starts afresh
        pass
    assert not after.calls


SETTINGS = BenchSettings("mlp", "{hidden: [16]}", (1, 8, 8), 10, 8)


@pytest.mark.parametrize(
    ("overrides", "span", "expected"),
    [
        (
            SUBJECTS["deep_interaction_vs_plain"][0],
            20,
            {"plain step": 18, "window step": 2, "validation": 1, "window backward": 1,
             "tangent pass": 1, "teacher update": 1},
        ),
        (
            SUBJECTS["deep_interaction_reversible_vs_plain"][0],
            20,
            {"plain step": 18, "window step": 2, "validation": 1, "window backward": 1,
             "tangent pass": 1, "teacher update": 1},
        ),
        (  # B = 3: the step between the first and the last is replayed
            [*SUBJECTS["deep_interaction_reversible_vs_plain"][0],
             "teacher.hypergrad.backprop_steps=3"],
            20,
            {"plain step": 17, "window step": 3, "validation": 1, "window backward": 2,
             "replay": 1, "tangent pass": 1, "teacher update": 1},
        ),
        (
            SUBJECTS["lookahead_vs_plain"][0],
            1,
            {"forward": 1, "training backward": 1, "validation": 1, "tangent pass": 1,
             "teacher update": 1, "step backward": 1},
        ),
    ],
    ids=["unrolled", "reversible", "reversible_b3", "lookahead"],
)  # fmt: skip
def test_each_methods_span_runs_the_phases_its_floor_counts(
    overrides: list[str], span: int, expected: dict[str, int]
) -> None:
    trainer = trainer_for(SETTINGS, overrides, random_bundle(8 * 2 * span, 16, (1, 8, 8), 10))
    batches = list(trainer.train_loader.epoch(0))
    for batch in batches[:span]:  # a whole span first: the clock starts on a span's first step
        _teaching_step(trainer, batch)
    with PhaseClock() as clock:
        for batch in batches[span : 2 * span]:
            _teaching_step(trainer, batch)
    assert dict(clock.calls) == expected
    assert all(seconds >= 0 for seconds in clock.seconds.values())
