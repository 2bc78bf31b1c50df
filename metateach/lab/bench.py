"""The cost of a teaching step against a plain training step, as ratios measured in one process.

Every time figure is time(subject) / time(reference), both measured here:
after warm-up, measurements of the subject and of the reference alternate
(in the order AB, then BA, ...), each pair gives a ratio, and a figure is
the median of its pairs' ratios, reported with their interquartile range
(``framework_overhead`` takes :data:`OVERHEAD_PAIRS` times the pairs).
The reference is a plain SGD step in bare PyTorch (an AdamW step for
``lookahead_adamw_vs_plain``, whose student is AdamW), taken on the
subject's own student: two instances of one network differ by up to 6% in
the speed of the same step (where their tensors lie in memory). For
``ours_vs_higher_lookahead`` the reference is the same Meta-Weight-Net
iteration written with ``higher``. Teachers that step every K student steps are measured over
whole spans of K. The memory figures compare the peak graph memory of a
teacher step at two truncations B. Beside each figure stands its *floor*
(:data:`FLOORS`): what the exact algorithm must compute, counted in plain
steps (a forward pass 1 unit, a backward 2, a plain step 3).
``python_overhead`` is the machine-independent check of the trainer: the
share of a plain step's time that the trainer adds outside PyTorch's
operators, by the profiler. ``wandb_logging_overhead`` times quickstart
runs with W&B offline against the same runs without it
(:data:`LOGGING_PAIRS` pairs; :data:`LOGGED_RUNS`).

The student and the data are random tensors of the asked shape (timing
does not need real images); the subjects run through the library's own
trainer and teaching strategies. On CUDA (``--device cuda``) the times are
CUDA events' and the memory the allocator's peak.

``tools/bench.py`` prints the table (and with ``--json`` a JSON line).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from metateach.config import load_config
from metateach.data import Batch, DataBundle, Split
from metateach.data.datasets import DatasetInfo
from metateach.data.noise import apply_label_noise
from metateach.data.transforms import Normalize
from metateach.engine.phases import PhaseClock
from metateach.lesson import lesson_loss
from metateach.optim.rules import reference_copy, rule_of
from metateach.trainer import Trainer

__all__ = [
    "BenchSettings", "Figure", "FLOORS", "random_bundle", "paired_ratios", "summarize",
    "python_overhead", "run_bench", "bare_sgd_steps", "trainer_for", "phase_table",
]  # fmt: skip


@dataclass(frozen=True)
class BenchSettings:
    """What the bench measures on: the student, the batch, the repeats."""

    model: str = "resnet32"
    model_kwargs: str = "{}"
    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    batch_size: int = 100
    steps: int = 3  # timed student steps per measurement
    repeats: int = 8  # pairs of measurements (subject, reference); the median ratio is reported
    warmup: int = 2  # untimed steps before the first measurement
    device: str = "cpu"  # cpu or cuda (CUDA events time the steps)


@dataclass(frozen=True)
class Figure:
    """A bench figure: the median ratio, the interquartile range of the pairs' ratios (None for
    a figure measured once), and the floor of :data:`FLOORS` (None where none is counted)."""

    value: float
    iqr: tuple[float, float] | None = None
    floor: float | None = None

    def as_json(self) -> dict[str, object]:
        return {"value": self.value, "iqr": self.iqr, "floor": self.floor}


def random_bundle(
    train: int, val: int, shape: tuple[int, int, int], num_classes: int, seed: int = 0
) -> DataBundle:
    """Random uint8 images with random labels, as a data set the trainer takes (no augmentation)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        targets = torch.randint(0, num_classes, (n,), generator=g)
        return Split(images, targets, targets.clone(), torch.arange(n))

    channels = shape[0]
    info = DatasetInfo(num_classes, (0.5,) * channels, (0.25,) * channels)
    train_split = split(train)
    noise = apply_label_noise("none", train_split.targets, num_classes, 0.0, g, train_split.images)
    return DataBundle(
        train=train_split,
        val=split(val),
        test=split(val),
        info=info,
        noise=noise,
        normalize=Normalize(torch.tensor(info.mean), torch.tensor(info.std)),
        augment=False,
    )


def bench_data(settings: BenchSettings, batches: int) -> DataBundle:
    """Random data of the bench's shape: ``batches`` training batches and two of validation."""
    size = settings.batch_size
    return random_bundle(size * batches, 2 * size, settings.image_shape, settings.num_classes)


def paired_ratios(
    subject: Callable[[], None], reference: Callable[[], None], settings: BenchSettings
) -> tuple[list[float], float]:
    """The ratios time(``subject``) / time(``reference``) of ``repeats`` pairs of measurements
    (one step a call, ``steps`` steps a measurement), and the reference's median seconds per step.

    After warm-up the two alternate, the pair's order flipping each time
    (AB, BA, AB, ...), so that a drift of the machine's speed, or a cache
    the first of a pair leaves warm, falls on both.
    """
    clock = _clock(settings.device)

    def timed(run: Callable[[], None]) -> float:
        return clock(run, settings.steps) / settings.steps

    for _ in range(settings.warmup):
        subject()
        reference()
    ratios, references = [], []
    for i in range(settings.repeats):
        if i % 2:
            after = timed(reference)
            first = timed(subject)
        else:
            first = timed(subject)
            after = timed(reference)
        ratios.append(first / after)
        references.append(after)
    return ratios, statistics.median(references)


def _clock(device: str) -> Callable[[Callable[[], None], int], float]:
    """Seconds that ``n`` calls of a function take: CUDA events on a GPU, the wall clock elsewhere."""
    if device.startswith("cuda"):

        def cuda_clock(run: Callable[[], None], n: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                run()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000

        return cuda_clock

    def wall_clock(run: Callable[[], None], n: int) -> float:
        begin = time.perf_counter()
        for _ in range(n):
            run()
        return time.perf_counter() - begin

    return wall_clock


def summarize(ratios: Sequence[float], floor: float | None = None) -> Figure:
    """A figure from its pairs' ratios: the median and the interquartile range."""
    if len(ratios) < 2:
        return Figure(ratios[0], (ratios[0], ratios[0]), floor)
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return Figure(statistics.median(ratios), (q1, q3), floor)


def python_overhead(
    trainer_step: Callable[[], None], bare_step: Callable[[], None], steps: int
) -> float:
    """The share of the trainer's plain step spent outside PyTorch's operators beyond what the
    bare loop spends there: the Python the trainer adds, as a fraction of its step.

    Each loop runs ``steps`` steps under the profiler; time outside the
    top-level operator events (backward's included) is Python's. The
    profiler's own cost falls on both loops alike.
    """
    from torch.profiler import ProfilerActivity, profile

    def outside_operators(run: Callable[[], None]) -> tuple[float, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            begin = time.perf_counter()
            for _ in range(steps):
                run()
            wall = time.perf_counter() - begin
        inside = sum(
            e.time_range.elapsed_us()
            for e in prof.events()
            if e.cpu_parent is None and not getattr(e, "is_user_annotation", False)
        )
        return max(wall - inside / 1e6, 0.0), wall

    trainer_step()  # warm both once more, outside the profile
    bare_step()
    trainer_outside, trainer_wall = outside_operators(trainer_step)
    bare_outside, _ = outside_operators(bare_step)
    return max(trainer_outside - bare_outside, 0.0) / trainer_wall


#: Where the bench's trainers keep their run folders: a directory of its own, removed when
#: the process ends (the bench's runs are not experiments).
_SCRATCH: tempfile.TemporaryDirectory[str] | None = None


def _scratch_dir() -> str:
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="metateach-bench-")
    return _SCRATCH.name


def trainer_for(settings: BenchSettings, overrides: Sequence[str], data: DataBundle) -> Trainer:
    """A trainer of the bench's student (momentum SGD, lr 0.1) on ``data``, quiet, with ``overrides``;
    its run folder lies in a temporary directory."""
    cfg = load_config(
        None,
        [
            f"train.out_dir={_scratch_dir()}",
            f"model.name={settings.model}",
            f"model.kwargs={settings.model_kwargs}",
            "optim.name=sgd",
            "optim.lr=0.1",
            "optim.momentum=0.9",
            "schedule.name=constant",
            f"train.batch_size={settings.batch_size}",
            f"teacher.hypergrad.val_batch_size={settings.batch_size}",
            "train.progress=false",
            f"train.device={settings.device}",
            "logging.wandb=disabled",
            "logging.plots=false",
            "logging.diagnostics=false",
            *overrides,
        ],
    )
    return Trainer(cfg, data=data)


def bare_sgd_steps(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[tuple]
) -> None:
    """The reference: a bare PyTorch loop (forward, cross-entropy, backward, step) over ``batches``."""
    model.train()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


#: The teaching steps timed against a plain step: key -> (the trainer's teacher overrides, the
#: student steps a teacher step spans: a measurement covers whole spans, so their cost is amortized).
SUBJECTS: dict[str, tuple[list[str], int]] = {
    "lookahead_vs_plain": (["teacher.name=meta_weight_net"], 1),  # one-step lookahead, its paper's
    # The same with an AdamW student, against a bare AdamW step (:data:`STUDENT_OPTIMIZERS`).
    "lookahead_adamw_vs_plain": (["teacher.name=meta_weight_net"], 1),
    "l2rw_vs_plain": (["teacher.name=learning_to_reweight"], 1),
    # A loss_fn teacher under the same lookahead: L2T-DLF's gated cross-entropy, whose
    # parameters act on the loss, where Meta-Weight-Net's act on the weights.
    "loss_fn_lookahead_vs_plain": (
        [
            "teacher.name=l2t_dlf",
            "teacher.hypergrad.method=lookahead",
            "teacher.hypergrad.inner_steps=1",
            "teacher.hypergrad.backprop_steps=1",
        ],
        1,
    ),
    # Truncated reverse mode over K = 20 student steps, through the last B = 2 (the method
    # named: the teacher's own default is the paper's reversible).
    "deep_interaction_vs_plain": (
        [
            "teacher.name=deep_interaction",
            "teacher.hypergrad.method=unrolled",
            "teacher.hypergrad.inner_steps=20",
            "teacher.hypergrad.backprop_steps=2",
        ],
        20,
    ),
    # The same by the paper's Algorithm 1: the window reversed exactly, in O(|theta|) memory.
    "deep_interaction_reversible_vs_plain": (
        [
            "teacher.name=deep_interaction",
            "teacher.hypergrad.method=reversible",
            "teacher.hypergrad.inner_steps=20",
            "teacher.hypergrad.backprop_steps=2",
        ],
        20,
    ),
    # L2T-DLN: rounds of K = B = 15 fully differentiated steps (its learned optimizer's own
    # step, every 10 rounds, falls outside a measurement of whole rounds).
    "dln_vs_plain": (["teacher.name=l2t_dln"], 15),
    "co_teaching_vs_plain": (["teacher.name=co_teaching"], 1),  # two networks, each step
    "srit_vs_plain": (
        ["teacher.name=co_teaching", "optim.sam.rho=0.05"],
        1,
    ),  # and SAM's two passes
    # L2T's filter, untrained, refilling each batch from further candidates.
    "l2t_vs_plain": (["teacher.name=l2t", "teacher.refill=true", "train.target_val_acc=0.9"], 1),
}

#: The memory figures: peak memory of one deep-interaction teacher step (K = 20) at B = 20
#: over B = 1 and over B = 2, key -> (method, the smaller B). The first differentiated step
#: holds no second-order graph, so B = 2 is the smallest window with one.
MEMORY: dict[str, tuple[str, int]] = {
    "reversible_memory_b20_vs_b1": ("reversible", 1),
    "reversible_memory_b20_vs_b2": ("reversible", 2),
    "unrolled_memory_b20_vs_b1": ("unrolled", 1),
    "unrolled_memory_b20_vs_b2": ("unrolled", 2),
}


#: What the exact algorithm behind each figure must compute, in plain steps (forward 1 unit,
#: backward 2, a plain step 3), and what bounds it; key -> (floor, the count).
FLOORS: dict[str, tuple[float, str]] = {
    "framework_overhead": (1.0, "the same forward, backward and step"),
    "lookahead_vs_plain": (
        10 / 3,
        "training forward and backward 3, validation forward and backward at theta' 3, the "
        "per-sample term by a tangent pass over the training forward's records 2 (two products "
        "a layer, W x' and W' x), the real step's backward under the updated teacher 2: 10 units",
    ),
    "lookahead_adamw_vs_plain": (10 / 3, "as lookahead_vs_plain: AdamW's update is elementwise"),
    "l2rw_vs_plain": (
        8 / 3,
        "as lookahead_vs_plain without the training backward (the virtual step is on a zero "
        "gradient), the weights read from the hypergradient: 8 units",
    ),
    "loss_fn_lookahead_vs_plain": (10 / 3, "as lookahead_vs_plain, the teacher acting in the loss"),
    "deep_interaction_vs_plain": (
        71 / 60,
        "18 plain steps 54 and the window's two 6 (the second keeps its graph), validation "
        "forward and backward 3, the backward through the second step's gradient graph 6 (a "
        "layer's double backward is six products: two for each of its forward and its two "
        "gradients), the first step's teacher term by the tangent pass over its records 2: "
        "71 units a span",
    ),
    "deep_interaction_reversible_vs_plain": (
        71 / 60,
        "as deep_interaction_vs_plain: the window's last step keeps its real pass's graph and "
        "its first the records of its forward, so at B = 2 nothing is replayed (from B = 3 on, "
        "each step between is replayed at its reconstructed parameters, 3 units more): 71 units "
        "a span (reversing the updates is elementwise)",
    ),
    "dln_vs_plain": (
        134 / 45,
        "a round of 15 steps 45, each differentiated: the backward through the gradient graphs "
        "of the 14 after the first 84 (6 each, as deep_interaction_vs_plain), the first's "
        "teacher term by the tangent pass 2, validation forward and backward 3: 134 units a round",
    ),
    "co_teaching_vs_plain": (2.0, "two networks, a forward and a backward each"),
    "srit_vs_plain": (4.0, "two networks, SAM's two forwards and backwards each"),
    "l2t_vs_plain": (
        5 / 3,
        "the untrained filter keeps about half: a forward of two candidate batches for its "
        "features 2, then the student's step 3",
    ),
    "reversible_memory_b20_vs_b2": (1.0, "one step's graph at a time, whatever B"),
}


#: ``framework_overhead`` takes this many times the pairs of the other figures: its target
#: sits within a few percent of 1, and in runs of 8 pairs bursts of noise on a shared
#: two-core machine moved its median by 0.1.
OVERHEAD_PAIRS = 4
#: ``wandb_logging_overhead``: pairs of quickstart runs, W&B offline against disabled.
LOGGING_PAIRS = 3
#: The quickstart runs whose logging is timed: the plain run, and the run as it ships (its
#: teacher's histograms and the diagnostic sample's table with its thumbnails).
LOGGED_RUNS = {
    "wandb_logging_overhead": ["teacher.name=none"],
    "wandb_logging_overhead_taught": [],
}
#: The quickstart, whose runs ``wandb_logging_overhead`` times (in the repository beside the package).
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

#: Subjects whose student is not the bench's momentum SGD: the optimizer's overrides, and the
#: ``torch.optim`` optimizer of the bare reference loop they are timed against.
STUDENT_OPTIMIZERS: dict[str, tuple[list[str], Callable[..., torch.optim.Optimizer]]] = {
    "lookahead_adamw_vs_plain": (
        ["optim.name=adamw", "optim.lr=1e-3"],
        partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-4),
    ),
}


def _whole_spans(settings: BenchSettings, span: int) -> BenchSettings:
    """``settings`` with the warm-up and each measurement rounded up to whole teacher steps of ``span``."""
    return replace(
        settings,
        steps=span * -(-settings.steps // span),
        warmup=span * -(-settings.warmup // span),
    )


def _teaching_step(trainer: Trainer, batch: Batch) -> None:
    """One step of ``trainer``'s teaching strategy (the student's, and the teacher's when due)."""
    trainer.teaching.strategy.step(batch, trainer.context())


def teacher_step_memory(settings: BenchSettings, method: str, backprop_steps: int) -> float:
    """Peak memory (MB) of one deep-interaction teacher step (K = 20, B = ``backprop_steps``).

    On CUDA the allocator's peak over the step; elsewhere the most memory the
    step's autograd graphs held at one moment (``teacher/graph_peak_mb``).
    """
    k = 20
    data = bench_data(settings, k + 1)
    trainer = trainer_for(
        settings,
        [
            "teacher.name=deep_interaction",
            f"teacher.hypergrad.method={method}",
            f"teacher.hypergrad.inner_steps={k}",
            f"teacher.hypergrad.backprop_steps={backprop_steps}",
        ],
        data,
    )
    stream = iter(trainer.train_loader.epoch(0))
    for _ in range(k):
        _teaching_step(trainer, next(stream))
    metrics = trainer.teaching.strategy.pop_metrics()
    return metrics.get("teacher/peak_cuda_mb", metrics["teacher/graph_peak_mb"])


def torch_optimizer(trainer: Trainer) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer the trainer's student optimizer stands for, from its
    state now: what ``higher`` differentiates (it knows PyTorch's classes only)."""
    lr = trainer.optimizer.param_groups[0]["lr"]
    return reference_copy(
        rule_of(trainer.optimizer), trainer.model.parameters(), lr, trainer.optimizer
    )


def higher_lookahead_step(trainer: Trainer, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
    """The reference of ``ours_vs_higher_lookahead``: one Meta-Weight-Net iteration with ``higher``.

    As its published loops write it: a differentiable copy of the student
    takes the virtual step (``higher``'s differentiable SGD from the real
    optimizer's state), the teacher steps on the validation loss's gradient
    through it, and the student steps on a new forward pass under the
    updated teacher. ``optimizer`` is the student's, as :func:`torch_optimizer` gives it.
    ``tests/test_bench.py`` checks that it leaves the student and the teacher where
    metateach's iteration does.
    """
    import higher

    problem, context = trainer.teaching.strategy.problem, trainer.context()
    model, teacher = problem.student, problem.teacher
    assert teacher is not None
    with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True) as (fmodel, diffopt):
        states = fmodel(batch.x, return_states=True)
        view = problem.view(states, batch, context)
        diffopt.step(lesson_loss(teacher(batch, view), states.logits, batch.y))
        (val,) = problem.val_stream.draw()
        val_loss = F.cross_entropy(fmodel(val.x), val.y)
        problem.teacher_step(torch.autograd.grad(val_loss, problem.teacher_params()))
    states = model(batch.x, return_states=True)
    with torch.no_grad():
        lesson = teacher(batch, problem.view(states, batch, context))
    optimizer.zero_grad(set_to_none=True)
    lesson_loss(lesson, states.logits, batch.y).backward()
    optimizer.step()


def logging_overhead(pairs: int = LOGGING_PAIRS, overrides: Sequence[str] = ()) -> list[float]:
    """Ratios of the wall time of quickstart runs with W&B offline to the same runs with
    ``logging.wandb=disabled``, alternating AB, BA, ... after one run of each to warm up, each
    run built and trained as ``tools/train.py`` does (its figures, and with a teacher its
    diagnostics, histograms and table). Runs in this process share W&B's service, which the
    warm-up starts: the figure is what logging adds to a run, not W&B's start (about a second,
    once per process). ``overrides`` change the quickstart (the plain run: ``teacher.name=none``)."""
    if not QUICKSTART.is_file():
        raise FileNotFoundError(
            f"{QUICKSTART}: wandb_logging_overhead runs the repository's quickstart"
        )

    def run(mode: str) -> float:
        cfg = load_config(QUICKSTART, [*overrides, f"logging.wandb={mode}",
                                       f"train.out_dir={_scratch_dir()}", "train.progress=false"])  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):  # the runs' epoch lines
            start = time.perf_counter()
            Trainer(cfg).fit()
            return time.perf_counter() - start

    run("offline"), run("disabled")
    ratios = []
    for i in range(pairs):
        order = ("disabled", "offline") if i % 2 else ("offline", "disabled")
        seconds = {mode: run(mode) for mode in order}
        ratios.append(seconds["offline"] / seconds["disabled"])
    return ratios


#: The bench's student optimizer in bare PyTorch: the reference loop's.
_SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9)


def _bare_loop(make: Callable[..., torch.optim.Optimizer], subject: Trainer) -> Callable[[], None]:
    """The reference: a bare loop on ``subject``'s student, with ``make``'s optimizer, on the
    tensors its data path gives; one step a call."""
    tensors = [(b.x, b.y) for b in subject.train_loader.epoch(1)]
    optimizer = make(subject.model.parameters())
    position = itertools.count()

    def bare() -> None:
        i = next(position) % len(tensors)
        bare_sgd_steps(subject.model, optimizer, tensors[i : i + 1])

    return bare


def _endless(trainer: Trainer, step: Callable[[Batch], object]) -> Callable[[], None]:
    """One step of ``step`` a call, on the trainer's batches, round and round."""
    batches = itertools.cycle(list(trainer.train_loader.epoch(0)))

    def one() -> None:
        step(next(batches))

    return one


def run_bench(settings: BenchSettings, keys: Sequence[str] | None = None) -> dict[str, Figure]:
    """Measure ``plain_step_ms``, ``framework_overhead``, ``python_overhead`` and the figures of
    :data:`SUBJECTS`, ``ours_vs_higher_lookahead`` and :data:`MEMORY` (all, or those in ``keys``)."""
    spans = {key: span for key, (_, span) in SUBJECTS.items() if keys is None or key in keys}
    longest = _whole_spans(settings, max([1, *spans.values()]))
    data = bench_data(settings, longest.warmup + longest.repeats * longest.steps + 1)
    results: dict[str, Figure] = {}

    # The plain step through the trainer and its data path, then each teaching step.
    plain = trainer_for(settings, ["teacher.name=none"], data)
    subjects = {"framework_overhead": (plain, plain.train_step, 1, _SGD)}
    for key, span in spans.items():
        overrides, make = STUDENT_OPTIMIZERS.get(key, ([], _SGD))
        trainer = trainer_for(settings, [*SUBJECTS[key][0], *overrides], data)
        subjects[key] = (trainer, partial(_teaching_step, trainer), span, make)
    for key, (trainer, step, span, make) in subjects.items():
        # The reference steps the subject's own student: two instances of one network differ
        # by up to 6% in the speed of the same bare step (where their tensors lie in memory).
        bare = _bare_loop(make, trainer)
        timing = _whole_spans(settings, span)
        overhead = key == "framework_overhead"
        if overhead:
            timing = replace(timing, repeats=OVERHEAD_PAIRS * settings.repeats)
        ratios, reference = paired_ratios(_endless(trainer, step), bare, timing)
        if overhead:
            results["plain_step_ms"] = Figure(1000 * reference)
        results[key] = summarize(ratios, FLOORS.get(key, (None,))[0])
    if keys is None or "python_overhead" in keys:
        share = python_overhead(
            _endless(plain, plain.train_step),
            _bare_loop(_SGD, plain),
            settings.steps * settings.repeats,
        )
        results["python_overhead"] = Figure(share)

    if keys is None or "ours_vs_higher_lookahead" in keys:
        ours = trainer_for(settings, SUBJECTS["lookahead_vs_plain"][0], data)
        theirs = trainer_for(settings, SUBJECTS["lookahead_vs_plain"][0], data)
        their_optimizer = torch_optimizer(theirs)
        ratios, _ = paired_ratios(
            _endless(ours, partial(_teaching_step, ours)),
            _endless(theirs, partial(higher_lookahead_step, theirs, optimizer=their_optimizer)),
            settings,
        )
        results["ours_vs_higher_lookahead"] = summarize(ratios)
    for key, overrides in LOGGED_RUNS.items():
        if keys is None or key in keys:
            results[key] = summarize(logging_overhead(overrides=overrides))
    memory: dict[tuple[str, int], float] = {}  # (method, B) -> MB, each measured once
    for key, (method, smaller) in MEMORY.items():
        if keys is None or key in keys:
            for b in (smaller, 20):
                if (method, b) not in memory:
                    memory[method, b] = teacher_step_memory(settings, method, b)
            floor = FLOORS.get(key, (None,))[0]
            results[key] = Figure(memory[method, 20] / memory[method, smaller], None, floor)
    return results


def profile_table(settings: BenchSettings, key: str, rows: int = 20) -> str:
    """PyTorch's profile of the teaching step ``key`` of :data:`SUBJECTS`: where its time goes.

    One whole teacher span after one of warm-up; operators by total CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    overrides, span = SUBJECTS[key]
    data = bench_data(settings, 2 * span + 1)
    trainer = trainer_for(settings, overrides, data)
    stream = iter(trainer.train_loader.epoch(0))
    for _ in range(span):
        _teaching_step(trainer, next(stream))
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
    )
    with profile(activities=activities) as prof:
        for _ in range(span):
            _teaching_step(trainer, next(stream))
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)


def phase_table(settings: BenchSettings, key: str, steps: int = 60) -> str:
    """Where the teaching step ``key`` of :data:`SUBJECTS` spends its time, phase by phase
    (:mod:`metateach.engine.phases`), in plain steps beside the floor's count (:data:`FLOORS`).

    After a span of warm-up, whole teacher spans of at least ``steps`` student steps
    in all (and at least three spans) run under a
    :class:`~metateach.engine.phases.PhaseClock`, each followed by as many bare plain
    steps of the same student (the unit). A phase's time is its own (a phase
    inside another counts for itself); what falls in none is the rest.
    """
    overrides, span = SUBJECTS[key]
    spans = max(3, -(-steps // span))
    extra, make = STUDENT_OPTIMIZERS.get(key, ([], _SGD))
    trainer = trainer_for(settings, [*overrides, *extra], bench_data(settings, span + 1))
    subject, bare = _endless(trainer, partial(_teaching_step, trainer)), _bare_loop(make, trainer)
    for _ in range(span):
        subject()
        bare()
    clock = _clock(settings.device)
    cuda = settings.device.startswith("cuda")
    totals, plain = [], []
    with PhaseClock(torch.cuda.synchronize if cuda else None) as phases:
        for _ in range(spans):
            totals.append(clock(subject, span))
            plain.append(clock(bare, span) / span)
    unit = statistics.median(plain)
    total = sum(totals) / spans
    rows = [
        (name, phases.calls[name] / spans, seconds / spans)
        for name, seconds in sorted(phases.seconds.items(), key=lambda item: -item[1])
    ]
    rows.append(("the rest (in no phase)", None, total - sum(r[2] for r in rows)))
    lines = [
        f"{key}: a span of {span} student step(s), the mean of {spans}; a plain step "
        f"(bare PyTorch) {1000 * unit:.1f} ms = 3 units",
        f"{'phase':<24}{'calls':>7}{'ms':>10}{'plain steps':>13}{'units':>8}",
    ]
    for name, calls, seconds in rows:
        count = "" if calls is None else f"{calls:g}"
        lines.append(
            f"{name:<24}{count:>7}{1000 * seconds:10.1f}{seconds / unit:13.2f}"
            f"{3 * seconds / unit:8.1f}"
        )
    lines.append(
        f"{'total':<24}{'':>7}{1000 * total:10.1f}{total / unit:13.2f}{3 * total / unit:8.1f}"
        f"   ({total / unit / span:.3f} a student step)"
    )
    if key in FLOORS:
        floor, count = FLOORS[key]
        lines.append(f"floor {floor:.3f} a student step: {count}")
    return "\n".join(lines)


#: What each figure is, for the table.
DESCRIPTIONS = {
    "plain_step_ms": "one plain SGD step, bare PyTorch (ms): the reference",
    "framework_overhead": "metateach's plain step (trainer, data path, no teacher) / bare step",
    "lookahead_vs_plain": "Meta-Weight-Net iteration (one-step lookahead + student step) / plain",
    "lookahead_adamw_vs_plain": "the same with an AdamW student / a bare AdamW step",
    "l2rw_vs_plain": "Learning-to-Reweight iteration / plain",
    "loss_fn_lookahead_vs_plain": "L2T-DLF's learned loss (a loss_fn teacher) by lookahead / plain",
    "deep_interaction_vs_plain": "deep-interaction teacher, K = 20, B = 2, per student step / plain",
    "deep_interaction_reversible_vs_plain": "the same by reversible (the paper's Algorithm 1) / plain",
    "dln_vs_plain": "L2T-DLN, K = B = 15, per student step / plain",
    "co_teaching_vs_plain": "co-teaching (two networks) / plain",
    "srit_vs_plain": "SRIT (co-teaching with SAM, two passes each) / plain",
    "l2t_vs_plain": "L2T's filter with refilled batches / plain",
    "ours_vs_higher_lookahead": "our Meta-Weight-Net iteration / the same written with higher",
    "python_overhead": "share of metateach's plain step spent in Python it adds (profiler)",
    "wandb_logging_overhead": "the quickstart without a teacher, W&B offline / W&B disabled",
    "wandb_logging_overhead_taught": "the quickstart as it ships (teacher, table), the same",
    "reversible_memory_b20_vs_b1": "reversible: peak memory of a teacher step, B = 20 / B = 1",
    "reversible_memory_b20_vs_b2": "reversible: the same, B = 20 / B = 2",
    "unrolled_memory_b20_vs_b1": "unrolled: peak memory of a teacher step, B = 20 / B = 1",
    "unrolled_memory_b20_vs_b2": "unrolled: the same, B = 20 / B = 2",
}


def main(argv: Sequence[str] | None = None, prog: str = "bench.py") -> int:
    """``python tools/bench.py [--json] [--model NAME] [--batch-size N] ...``: the table of ratios."""
    import argparse
    import json

    defaults = BenchSettings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with the figures as a JSON line")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument(
        "--model-kwargs", default=defaults.model_kwargs, help="YAML, e.g. '{hidden: [64]}'"
    )
    parser.add_argument("--image-shape", type=int, nargs=3, default=defaults.image_shape)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="steps per measurement")
    parser.add_argument(
        "--repeats", type=int, default=defaults.repeats, help="measurements (median)"
    )
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default: cpu)"
    )
    parser.add_argument(
        "--keys",
        nargs="*",
        choices=[k for k in DESCRIPTIONS if k not in ("plain_step_ms", "framework_overhead")],
        help="figures to measure (default: all)",
    )
    parser.add_argument(
        "--profile", choices=list(SUBJECTS), help="instead, profile one teaching step's operators"
    )
    parser.add_argument(
        "--phases",
        choices=list(SUBJECTS),
        help="instead, time one teaching step's phases (validation pass, tangent pass, ...)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    settings = BenchSettings(
        args.model, args.model_kwargs, tuple(args.image_shape), defaults.num_classes,
        args.batch_size, args.steps, args.repeats, args.warmup, args.device,
    )  # fmt: skip
    if args.profile:
        print(profile_table(settings, args.profile))
        return 0
    if args.phases:
        print(phase_table(settings, args.phases))
        return 0
    where = "cuda" if args.device == "cuda" else f"cpu, {args.threads} threads"
    print(
        f"{settings.model} on batches of {settings.batch_size} {tuple(settings.image_shape)} "
        f"({where}); median of {settings.repeats} pairs of {settings.steps} steps after "
        f"{settings.warmup}, rounded up to whole teacher spans; floors in plain steps"
    )
    results = run_bench(settings, args.keys)
    width = max(len(k) for k in results)
    print(f"{'figure':<{width}}  {'value':>8}  {'IQR':>13}  {'floor':>5}  what")
    for key, figure in results.items():
        iqr = f"{figure.iqr[0]:.2f}-{figure.iqr[1]:.2f}" if figure.iqr else ""
        floor = f"{figure.floor:.2f}" if figure.floor is not None else ""
        print(f"{key:<{width}}  {figure.value:8.3g}  {iqr:>13}  {floor:>5}  {DESCRIPTIONS[key]}")
    if args.json:
        print(json.dumps({key: figure.as_json() for key, figure in results.items()}))
    return 0
