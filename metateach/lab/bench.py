"""The cost of a teaching step against a plain training step, as ratios measured in one process.

Every time figure is time(subject) / time(reference), both measured here:
after warm-up, the subject's measurements alternate with the reference's,
and the ratio is of the medians. The reference is a plain SGD step in bare
PyTorch (an AdamW step for ``lookahead_adamw_vs_plain``, whose student is AdamW), or for ``ours_vs_higher_lookahead`` the same Meta-Weight-Net
iteration written with ``higher``. Teachers that step every K student
steps are measured over whole spans of K. The memory figures compare the
peak graph memory of a teacher step at two truncations B. The student and
the data are random tensors of the asked shape (timing does not need real
images); the subjects run through the library's own trainer and teaching
strategies.

``tools/bench.py`` prints the table (and with ``--json`` a JSON line).
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from metateach.config import load_config
from metateach.data import Batch, DataBundle, Split
from metateach.data.datasets import DatasetInfo
from metateach.data.noise import apply_label_noise
from metateach.data.transforms import Normalize
from metateach.lesson import lesson_loss
from metateach.optim.rules import reference_copy, rule_of
from metateach.trainer import Trainer

__all__ = [
    "BenchSettings", "random_bundle", "paired_seconds", "run_bench", "bare_sgd_steps", "trainer_for",
]  # fmt: skip


@dataclass(frozen=True)
class BenchSettings:
    """What the bench measures on: the student, the batch, the repeats."""

    model: str = "resnet32"
    model_kwargs: str = "{}"
    image_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 10
    batch_size: int = 100
    steps: int = 5  # timed student steps per measurement
    repeats: int = 5  # measurements; the median is reported
    warmup: int = 2  # untimed steps before the first measurement


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


def paired_seconds(
    subject: Callable[[], None], reference: Callable[[], None], settings: BenchSettings
) -> tuple[float, float]:
    """Seconds per step of ``subject`` and of ``reference`` (one step a call), measured in turn.

    Warm-up, then ``repeats`` measurements of ``steps`` steps each, alternating
    between the two so that a drift of the machine's speed falls on both;
    the medians.
    """

    def timed(run: Callable[[], None]) -> float:
        start = time.perf_counter()
        for _ in range(settings.steps):
            run()
        return (time.perf_counter() - start) / settings.steps

    for _ in range(settings.warmup):
        subject()
        reference()
    pairs = [(timed(subject), timed(reference)) for _ in range(settings.repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def trainer_for(settings: BenchSettings, overrides: Sequence[str], data: DataBundle) -> Trainer:
    """A trainer of the bench's student (momentum SGD, lr 0.1) on ``data``, quiet, with ``overrides``."""
    cfg = load_config(
        None,
        [
            f"model.name={settings.model}",
            f"model.kwargs={settings.model_kwargs}",
            "optim.name=sgd",
            "optim.lr=0.1",
            "optim.momentum=0.9",
            "schedule.name=constant",
            f"train.batch_size={settings.batch_size}",
            f"teacher.hypergrad.val_batch_size={settings.batch_size}",
            "train.progress=false",
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
    # Truncated reverse mode over K = 20 student steps, through the last B = 2.
    "deep_interaction_vs_plain": (
        [
            "teacher.name=deep_interaction",
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


def run_bench(settings: BenchSettings, keys: Sequence[str] | None = None) -> dict[str, float]:
    """Measure ``framework_overhead`` and the figures of :data:`SUBJECTS`, ``ours_vs_higher_lookahead``
    and :data:`MEMORY` (all, or those in ``keys``)."""
    spans = {key: span for key, (_, span) in SUBJECTS.items() if keys is None or key in keys}
    longest = _whole_spans(settings, max([1, *spans.values()]))
    data = bench_data(settings, longest.warmup + longest.repeats * longest.steps + 1)
    results: dict[str, float] = {}

    def bare_loop(
        overrides: Sequence[str], make: Callable[..., torch.optim.Optimizer]
    ) -> Callable[[], None]:
        """The reference: a bare loop on the tensors the plain trainer's data path gives."""
        plain = trainer_for(settings, ["teacher.name=none", *overrides], data)
        tensors = [(b.x, b.y) for b in plain.train_loader.epoch(1)]
        optimizer = make(plain.model.parameters())
        position = itertools.count()

        def bare() -> None:
            i = next(position) % len(tensors)
            bare_sgd_steps(plain.model, optimizer, tensors[i : i + 1])

        return bare

    sgd = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    # The plain step through the trainer and its data path, then each teaching step.
    plain = trainer_for(settings, ["teacher.name=none"], data)
    subjects = {"framework_overhead": (plain, plain.train_step, 1)}
    for key, span in spans.items():
        overrides, _ = STUDENT_OPTIMIZERS.get(key, ([], sgd))
        trainer = trainer_for(settings, [*SUBJECTS[key][0], *overrides], data)
        subjects[key] = (trainer, partial(_teaching_step, trainer), span)
    for key, (trainer, step, span) in subjects.items():
        stream = iter(trainer.train_loader.epoch(0))
        timing = _whole_spans(settings, span)
        bare = bare_loop(*STUDENT_OPTIMIZERS.get(key, ([], sgd)))
        seconds, reference = paired_seconds(lambda s=stream, f=step: f(next(s)), bare, timing)
        if key == "framework_overhead":
            results["plain_step_ms"] = 1000 * reference
        results[key] = seconds / reference

    if keys is None or "ours_vs_higher_lookahead" in keys:
        ours = trainer_for(settings, SUBJECTS["lookahead_vs_plain"][0], data)
        theirs = trainer_for(settings, SUBJECTS["lookahead_vs_plain"][0], data)
        ours_stream = iter(ours.train_loader.epoch(0))
        their_stream = iter(theirs.train_loader.epoch(0))
        their_optimizer = torch_optimizer(theirs)
        seconds, reference = paired_seconds(
            lambda: _teaching_step(ours, next(ours_stream)),
            lambda: higher_lookahead_step(theirs, next(their_stream), their_optimizer),
            settings,
        )
        results["ours_vs_higher_lookahead"] = seconds / reference
    memory: dict[tuple[str, int], float] = {}  # (method, B) -> MB, each measured once
    for key, (method, smaller) in MEMORY.items():
        if keys is None or key in keys:
            for b in (smaller, 20):
                if (method, b) not in memory:
                    memory[method, b] = teacher_step_memory(settings, method, b)
            results[key] = memory[method, 20] / memory[method, smaller]
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


#: What each figure is, for the table.
DESCRIPTIONS = {
    "plain_step_ms": "one plain SGD step, bare PyTorch (ms): the reference",
    "framework_overhead": "metateach's plain step (trainer, data path, no teacher) / bare step",
    "lookahead_vs_plain": "Meta-Weight-Net iteration (one-step lookahead + student step) / plain",
    "lookahead_adamw_vs_plain": "the same with an AdamW student / a bare AdamW step",
    "l2rw_vs_plain": "Learning-to-Reweight iteration / plain",
    "loss_fn_lookahead_vs_plain": "L2T-DLF's learned loss (a loss_fn teacher) by lookahead / plain",
    "deep_interaction_vs_plain": "deep-interaction teacher, K = 20, B = 2, per student step / plain",
    "dln_vs_plain": "L2T-DLN, K = B = 15, per student step / plain",
    "co_teaching_vs_plain": "co-teaching (two networks) / plain",
    "srit_vs_plain": "SRIT (co-teaching with SAM, two passes each) / plain",
    "l2t_vs_plain": "L2T's filter with refilled batches / plain",
    "ours_vs_higher_lookahead": "our Meta-Weight-Net iteration / the same written with higher",
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
        "--keys",
        nargs="*",
        choices=list(DESCRIPTIONS)[2:],
        help="figures to measure (default: all)",
    )
    parser.add_argument(
        "--profile", choices=list(SUBJECTS), help="instead, profile one teaching step's operators"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = BenchSettings(
        args.model, args.model_kwargs, tuple(args.image_shape), defaults.num_classes,
        args.batch_size, args.steps, args.repeats, args.warmup,
    )  # fmt: skip
    if args.profile:
        print(profile_table(settings, args.profile))
        return 0
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(
        f"{settings.model} on batches of {settings.batch_size} {tuple(settings.image_shape)} "
        f"({device}); median of {settings.repeats} x {settings.steps} steps after {settings.warmup}, "
        "rounded up to whole teacher spans"
    )
    results = run_bench(settings, args.keys)
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:8.2f}  {DESCRIPTIONS[key]}")
    if args.json:
        print(json.dumps(results))
    return 0
