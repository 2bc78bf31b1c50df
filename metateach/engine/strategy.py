"""Teaching strategies: how a training step goes, and when and how the teacher learns.

The trainer calls :meth:`TeachingStrategy.step` once per batch and knows
nothing else. :class:`StudentOnly` takes a plain student step with the
teacher's lesson (no teacher, a fixed rule, or a frozen teacher).
:class:`HypergradMethod` is the base of the methods that also update the
teacher by the gradient of the validation loss; each lives in a file of its
own and is registered by name in :data:`metateach.registry.HYPERGRADS`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from metateach.data import Batch, as_batch
from metateach.distributed import sum_gradients
from metateach.engine.meter import UpdateMeter
from metateach.engine.phases import phase, timed
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.second_order import second_order
from metateach.engine.tangent import ForwardRecord, recording
from metateach.lesson import Lesson, lesson_loss
from metateach.optim.rules import UpdateRule
from metateach.optim.schedules import set_lr
from metateach.registry import STRATEGIES
from metateach.teacher import LearnedUpdates, StudentView, Teacher, TeachingContext
from metateach.types import Params, RNGState

__all__ = ["Differentiates", "TeachingStrategy", "StudentOnly", "HypergradMethod", "PerStepMethod"]


class Differentiates(enum.Enum):
    """What a method's hypergradient is the derivative of: what
    :func:`~metateach.hypergrad.check.check_hypergradient` compares it with."""

    #: The validation loss after the span's K student steps, through the last B of
    #: them (the first K - B taken under the teacher as it is).
    WINDOW = "window"
    #: The validation loss at the student's optimum of the training loss (the
    #: implicit function theorem; exact only there).
    OPTIMUM = "optimum"
    #: The validation loss after a round of K steps under lesson weights that the
    #: teacher's learned optimizer wrote from the previous round's gradient, held constant.
    ROUNDS = "rounds"
    #: The validation loss after one step, in each training sample's weight.
    SAMPLE_WEIGHTS = "sample_weights"


class TeachingStrategy(ABC):
    """One student step per call, and whatever the teacher does around it."""

    #: Runs data-parallel (:mod:`metateach.distributed`): every gradient it
    #: forms from a batch is summed over the processes where the engine sums them.
    data_parallel: ClassVar[bool] = False

    def __init__(self, problem: BilevelProblem) -> None:
        self.problem = problem
        problem.record = self.record
        self._metrics: dict[str, list[float]] = defaultdict(list)  # since the last pop_metrics()
        self._epoch_metrics: dict[str, list[float]] = defaultdict(list)  # in this epoch
        self._totals: dict[str, int] = {}  # running counts since the run began

    @abstractmethod
    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        """Train on ``batch``; return the step's statistics (see :meth:`BilevelProblem.statistics`)."""

    def can_checkpoint(self) -> bool:
        """Whether the run can be saved now (not in the middle of a differentiable window)."""
        return True

    def end_of_run(self, history: Sequence[Mapping[str, float]], context: TeachingContext) -> None:
        """Called once when the run has ended, with its per-epoch records and where it stopped."""
        _ = history, context

    def networks(self) -> dict[str, torch.nn.Module]:
        """Networks the strategy trains besides the student, by name (a peer), for evaluation."""
        return {}

    def preview(self, batch: Batch, context: TeachingContext) -> tuple[StudentView, Lesson | None]:
        """The teacher's view of ``batch`` and the lesson it would give it now, changing nothing.

        For the diagnostics: the student's pass runs on scratch BatchNorm
        buffers and nothing steps; the caller keeps the run's random stream
        (``problem.own_rng()``). The view is the one the strategy's real steps
        show the teacher (:meth:`previewed` adds what only this strategy reads).
        """
        problem = self.problem
        with torch.enable_grad():
            rng = problem.rng_state()
            states = problem.states(problem.params(), batch.x, real=False)
            view = self.previewed(problem.view(states, batch, context), batch, rng)
        with torch.no_grad():
            return view, None if problem.teacher is None else problem.teacher(batch, view)

    def previewed(self, view: StudentView, batch: Batch, rng: RNGState) -> StudentView:
        """The view :meth:`preview` shows the teacher: ``view`` itself, unless the strategy adds to it."""
        _ = batch, rng
        return view

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the metrics not yet handed out, and subclasses' state."""
        refill = self.problem.refill
        return {
            "metrics": {k: list(v) for k, v in self._metrics.items()},
            "epoch_metrics": {k: list(v) for k, v in self._epoch_metrics.items()},
            "totals": dict(self._totals),
            "refill_position": None if refill is None else refill.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        for mine, saved in (
            (self._metrics, state["metrics"]),
            (self._epoch_metrics, state["epoch_metrics"]),
        ):
            mine.clear()
            mine.update({k: list(v) for k, v in saved.items()})
        self._totals = dict(state.get("totals", {}))
        if self.problem.refill is not None:
            self.problem.refill.position = state["refill_position"]

    def record(self, **values: float) -> None:
        """Note metrics; :meth:`pop_metrics` hands out their means."""
        for key, value in values.items():
            self._metrics[key].append(float(value))
            self._epoch_metrics[key].append(float(value))

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to a running total, which :meth:`pop_metrics` reports as it stands."""
        self._totals[key] = self._totals.get(key, 0) + n

    def pop_metrics(self, epoch: bool = False) -> dict[str, float]:
        """The means of the metrics recorded since the last call, and the running totals.

        With ``epoch``, the means over everything recorded since the last such
        call (the epoch's, whatever was handed out at log points meanwhile).
        """
        source = self._epoch_metrics if epoch else self._metrics
        out = {k: sum(v) / len(v) for k, v in source.items() if v}
        out.update({k: float(v) for k, v in self._totals.items()})
        self._metrics.clear()
        if epoch:
            self._epoch_metrics.clear()
        return out


@STRATEGIES.register("student_only")
class StudentOnly(TeachingStrategy):
    """Plain student steps under the teacher's lessons; the teacher does not learn."""

    data_parallel = True

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        return self.problem.real_step(batch, context)


@STRATEGIES.register("with_student")
class WithStudentSteps(TeachingStrategy):
    """Student steps under the teacher's lessons; the teacher's parameters step with the student's,
    on the gradient of the same training loss (:class:`~metateach.learning.WithStudent`).

    Both gradients are taken at the same point, before either steps. The
    teacher's follows the loss through the lesson alone, not the network.
    """

    data_parallel = True

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        assert problem.teacher is not None and problem.teacher_optimizer is not None
        set_lr(problem.teacher_optimizer, problem.optimizer.param_groups[0]["lr"])
        real = problem.real_pass(batch, context, teacher_grad=True)
        params = [p for p in problem.teacher.parameters() if p.requires_grad]
        grads = torch.autograd.grad(real.train.loss, params, retain_graph=True, allow_unused=True)
        problem.descend(real.train, real.batch, real.rng)
        stepped = problem.teacher_step(sum_gradients(grads))
        self.count("teacher/skipped_steps", 0 if stepped else 1)
        return problem.statistics(real.train.view, real.batch, real.train.lesson, real.examined)


class HypergradMethod(TeachingStrategy):
    """A strategy that updates the teacher by a hypergradient every ``inner_steps`` student steps.

    Args:
        problem: the bilevel problem.
        inner_steps: K, student steps per teacher step.
        backprop_steps: B, how many of them the hypergradient reaches back through.
    """

    #: What its hypergradient is the derivative of.
    differentiates: ClassVar[Differentiates] = Differentiates.WINDOW

    def __init__(self, problem: BilevelProblem, inner_steps: int, backprop_steps: int) -> None:
        super().__init__(problem)
        reason = self.refuses(problem.teacher) or self.refuses_rule(problem.rule)
        if reason is not None:
            raise ValueError(reason)
        if not 1 <= backprop_steps <= inner_steps:
            raise ValueError(f"need 1 <= B <= K, got K={inner_steps}, B={backprop_steps}")
        self.inner_steps = inner_steps
        self.backprop_steps = backprop_steps
        self.position = 0  # student steps taken in the current window of K
        #: While :meth:`hypergradient` runs: where the hypergradients go instead of the teacher.
        self._captured: list[list[Tensor | None]] | None = None
        #: The last hypergradient the teacher stepped on, flat, for the next one's cosine.
        self._previous: Tensor | None = None

    @classmethod
    def refuses(cls, teacher: Teacher | None) -> str | None:
        """Why this method cannot teach ``teacher``, or None when it can.

        A teacher whose lesson a learned optimizer writes (:class:`~metateach.teacher.LearnedUpdates`)
        is taught by ``learned_optimizer`` alone: its lesson's weights are not
        trainable parameters for another method to step.
        """
        if isinstance(teacher, LearnedUpdates):
            return (
                f"the lesson of {type(teacher).__name__} is written by its learned optimizer: "
                "it needs teacher.hypergrad.method=learned_optimizer"
            )
        return None

    @classmethod
    def refuses_rule(cls, rule: UpdateRule) -> str | None:
        """Why this method cannot differentiate the student's update ``rule``, or None when it can."""
        _ = rule
        return None

    def state_dict(self) -> dict[str, Any]:
        stream = self.problem.val_stream
        return {
            **super().state_dict(),
            "position": self.position,
            "val_position": stream.position if stream else 0,
            "previous_hypergrad": self._previous,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.position = state["position"]
        self._previous = state.get("previous_hypergrad")
        if self.problem.val_stream is not None:
            self.problem.val_stream.position = state["val_position"]

    @timed("teacher update")
    def update_teacher(self, grads: Sequence[Tensor | None]) -> None:
        """Apply a hypergradient to the teacher, or count it as skipped when it is not finite.

        Under data parallelism ``grads`` are this process's share; their sum
        over the processes is the step, the same on every one.
        """
        grads = sum_gradients(grads)
        if self._captured is not None:
            self._captured.append(grads)
            return
        params = self.problem.teacher_params()
        flat = torch.cat([
            (torch.zeros_like(p) if g is None else g).detach().double().flatten().cpu()
            for p, g in zip(params, grads, strict=True)
        ])  # fmt: skip
        stepped = self.problem.teacher_step(grads)
        if stepped:
            norm = flat.norm()
            self.record(**{"teacher/hypergrad_norm": float(norm)})
            # How far the teacher's direction turned since its last step.
            if self._previous is not None:
                cosine = flat @ self._previous / (norm * self._previous.norm()).clamp(min=1e-300)
                self.record(**{"teacher/hypergrad_cosine": float(cosine)})
            self._previous = flat
        self.count("teacher/skipped_steps", 0 if stepped else 1)

    def hypergradient(
        self,
        batches: Sequence[Batch | tuple[Tensor, Tensor]],
        contexts: Sequence[TeachingContext] | None = None,
        learning_rates: Sequence[float] | None = None,
    ) -> dict[str, Tensor]:
        """The hypergradient this method forms over ``batches``, by name of the teacher's trainable parameters.

        The method takes its student steps on ``batches`` from the current
        state, as in training, and the gradient it would hand the teacher's
        optimizer at the last of them is returned. Then the student, its
        optimizer, the teacher, the random state and the method are put back
        as they were: nothing is stepped. ``batches`` make up one teacher span
        from here: the last ends it and no other does (K batches for most
        methods; ``learned_optimizer`` forms its first after two rounds when
        ``rounds`` is 1).

        Args:
            batches: one per student step, :class:`~metateach.data.Batch` es or
                plain (inputs, labels) pairs.
            contexts: the teacher's context at each step (default: step t of
                ``len(batches)``, no history).
            learning_rates: the student's learning rate at each step (default:
                the optimizer's, as it stands).
        """
        problem = self.problem
        if problem.teacher is None:
            raise ValueError("this problem has no teacher, so no hypergradient")
        if self.position != 0 or not self.can_checkpoint():
            raise RuntimeError(
                f"{type(self).__name__} is inside a teacher span ({self.position} steps in); "
                "a hypergradient is taken from the start of one"
            )
        batches, contexts, rates = _span(batches, contexts, learning_rates)
        state = self.state_dict()
        with problem.preserved():
            try:
                return self._span_hypergradient(batches, contexts, rates)
            finally:
                self.load_state_dict(state)  # its own state and the streams' positions

    def _span_hypergradient(
        self, batches: list[Batch], contexts: list[TeachingContext], rates: list[float] | None
    ) -> dict[str, Tensor]:
        """:meth:`hypergradient`'s work, on checked arguments; everything is put back after it."""
        problem = self.problem
        assert problem.teacher is not None
        captured: list[list[Tensor | None]] = []
        formed_at = []
        self._captured = captured
        try:
            for t, (batch, context) in enumerate(zip(batches, contexts, strict=True)):
                self.set_rate(rates, t)
                self.step(batch, context)
                formed_at += [t] * (len(captured) - len(formed_at))
        except BaseException:
            self.end_of_run([], contexts[-1])  # drop the unfinished window
            raise
        finally:
            self._captured = None
        if formed_at != [len(batches) - 1]:
            where = ", ".join(str(t + 1) for t in formed_at) or "none"
            raise ValueError(
                f"{type(self).__name__} must form one hypergradient, at the last of the "
                f"{len(batches)} batches; it formed them after steps: {where} "
                f"(K = {self.inner_steps} steps a teacher step)"
            )
        names = [k for k, p in problem.teacher.named_parameters() if p.requires_grad]
        return {
            k: torch.zeros_like(p) if g is None else g
            for k, p, g in zip(names, problem.teacher_params(), captured[0], strict=True)
        }

    def set_rate(self, rates: Sequence[float] | None, t: int) -> None:
        """The student's learning rate for step ``t`` of a span, when ``rates`` give one."""
        if rates is not None:
            set_lr(self.problem.optimizer, rates[t])

    @property
    def skipped(self) -> int:
        """Teacher steps skipped for a non-finite hypergradient, since the run began."""
        return self._totals.get("teacher/skipped_steps", 0)

    @contextmanager
    def measured(self) -> Iterator[None]:
        """Measure a teacher update that fits in one block; see :class:`UpdateMeter`."""
        meter = UpdateMeter(self.problem.student)
        meter.start()
        try:
            yield
        finally:
            self.record(**meter.stop())


class PerStepMethod(HypergradMethod):
    """Methods that update the teacher from one batch, then take the student's step.

    Every ``inner_steps`` steps (every step by default) the teacher first
    learns from the batch: :meth:`teacher_gradient` gets the forward pass at
    the student's current parameters. The student's real step then follows
    with the updated teacher's lesson, reusing that forward pass (one
    forward, and BatchNorm's running statistics updated once). This is the
    order of Meta-Weight-Net and Learning-to-Reweight.
    """

    #: Whether :meth:`teacher_gradient` takes a tangent pass that reuses the forward pass
    #: (recorded in :attr:`forward_record`).
    records_forward: ClassVar[bool] = False
    #: Whether :meth:`teacher_gradient` differentiates the forward pass twice (its batch norms
    #: and convolutions then take :mod:`metateach.engine.second_order`'s fused double backwards).
    differentiates_twice: ClassVar[bool] = False

    def __init__(
        self, problem: BilevelProblem, inner_steps: int = 1, backprop_steps: int = 1
    ) -> None:
        if backprop_steps != 1:
            raise ValueError(
                f"{type(self).__name__} looks one step ahead: backprop_steps must be 1"
            )
        super().__init__(problem, inner_steps, backprop_steps)
        #: The random state before the batch's forward pass, to re-run it with the same draws.
        self.forward_rng: RNGState | None = None
        #: The batch's forward pass, recorded for a tangent pass when ``records_forward``.
        self.forward_record: ForwardRecord | None = None

    @abstractmethod
    def teacher_gradient(
        self, params: Params, batch: Batch, train: TrainPass
    ) -> Sequence[Tensor | None]:
        """d(validation loss)/d(teacher parameters), from the pass ``train`` at ``params``.

        The pass's graph must survive (``retain_graph=True``): the student's
        step backpropagates through it afterwards.
        """

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        problem = self.problem
        self.position += 1
        if self.position < self.inner_steps:
            return problem.real_step(batch, context)
        self.position = 0
        params = problem.params()
        with self.measured():
            self.forward_rng = problem.rng_state()
            with (
                phase("forward"),
                recording(self.records_forward) as self.forward_record,
                second_order(self.differentiates_twice),
            ):
                states = problem.states(params, batch.x, real=True)
            train = problem.taught(states, batch, context)
            self.update_teacher(self.teacher_gradient(params, batch, train))
            self.forward_record = None
        lesson = problem.lesson(batch, train.view, teacher_grad=False)
        settings = None if lesson is None else lesson.step
        with phase("step backward"):
            problem.apply_gradients(lesson_loss(lesson, train.states, batch.y), settings=settings)
        return problem.statistics(train.view, batch, lesson)


def _span(
    batches: Sequence[Batch | tuple[Tensor, Tensor]],
    contexts: Sequence[TeachingContext] | None,
    learning_rates: Sequence[float] | None,
) -> tuple[list[Batch], list[TeachingContext], list[float] | None]:
    """The arguments of :meth:`HypergradMethod.hypergradient`, checked, with their defaults."""
    batches = [as_batch(b) for b in batches]
    if not batches:
        raise ValueError("a hypergradient needs at least one batch")
    n = len(batches)
    if contexts is None:
        zero = torch.zeros((), dtype=torch.float64)
        contexts = [TeachingContext(t, 0, n, zero, 0.0) for t in range(n)]
    for what, given in (("contexts", contexts), ("learning_rates", learning_rates)):
        if given is not None and len(given) != n:
            raise ValueError(f"{what} must give one entry per batch: {n}, got {len(given)}")
    return batches, list(contexts), None if learning_rates is None else list(learning_rates)
