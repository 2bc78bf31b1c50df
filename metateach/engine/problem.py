"""The bilevel problem every teaching strategy works on.

Inner problem: the student minimizes the lesson-weighted training loss with
its optimizer's update rule (:mod:`metateach.optim.rules`). Outer problem: the teacher minimizes the student's loss on
clean validation batches. :class:`BilevelProblem` holds the pieces (student
and its optimizer, teacher and its optimizer, the validation stream) and
the operations the strategies share: the student's loss at any parameters,
the validation loss, a real student step, and a teacher step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, autograd

from metateach.data import Batch, BatchStream, RepeatedBatch, WholeSplit
from metateach.distributed import sum_gradients
from metateach.engine.phases import timed
from metateach.engine.refill import refilled
from metateach.errors import NonFiniteStep
from metateach.functional import scratch_buffers, student_forward
from metateach.lesson import Lesson, StepSettings, lesson_loss
from metateach.optim.rules import (
    NextStep,
    RuleOptimizer,
    State,
    UpdateRule,
    rule_of,
    set_state,
    state_of,
)
from metateach.optim.sam import SAM
from metateach.student import Student, StudentStates
from metateach.teacher import StudentView, Teacher, TeachingContext
from metateach.types import Params, RNGState, StepStats

__all__ = ["BilevelProblem", "TrainPass", "RealPass"]


class TrainPass(NamedTuple):
    """A training forward pass: the lesson's loss, the student's states (with their graph), the
    view, the lesson."""

    loss: Tensor
    states: StudentStates
    view: StudentView
    lesson: Lesson | None

    @property
    def step_settings(self) -> StepSettings | None:
        """The lesson's settings for the optimizer's step (with their graph), if it sets any."""
        return None if self.lesson is None else self.lesson.step


class RealPass(NamedTuple):
    """A real step's pass: the batch the student learns from, the pass, and what the step needs."""

    batch: Batch  # refilled with the teacher's choices under ``teacher.refill``
    train: TrainPass
    log_prob: Tensor | None  # of the teacher's draws, on every candidate batch
    rng: RNGState | None  # under SAM, the random state its second pass replays
    examined: int  # the samples the step looked at: every candidate under ``teacher.refill``


@contextlib.contextmanager
def _forked_rng(device: torch.device, state: RNGState | None) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if state is not None:
            torch.set_rng_state(state.cpu)
            if state.cuda is not None:
                torch.cuda.set_rng_state(state.cuda, device)
        yield


def _all_finite(grads: Sequence[Tensor | None]) -> bool:
    """Whether no gradient holds inf or nan (one device sync)."""
    present = [g for g in grads if g is not None]
    if not present:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in present]).all())


@dataclass
class BilevelProblem:
    """Student, teacher and validation data, and what the teaching strategies do with them.

    Built by :func:`metateach.teaching.build_teaching` from a config, or in
    code (see docs/writing-a-teacher.md, "Hypergradients in code").

    Args:
        student: the student network.
        optimizer: its real optimizer: one :func:`~metateach.optim.build_optimizer` builds
            (under SAM too), or a ``torch.optim.SGD``; the hypergradient methods
            differentiate its update rule.
        teacher: the teacher, or None for plain training.
        teacher_optimizer: the teacher's optimizer, when it learns.
        val_stream: clean validation batches for the outer objective, when the
            teacher learns: a stream, or one batch (a :class:`~metateach.data.Batch`
            or a plain (inputs, labels) pair) used every time.
        clean_targets: the training split's true labels, by sample index (for
            statistics only; by default the labels the batches carry).
        keep_weight_grad: the teacher sees states that keep their graph to the
            student's parameters (dw/dtheta kept); otherwise they are detached.
        refill: further training batches, for a filtering teacher whose batches
            are refilled until they are full (``teacher.refill``, L2T).
    """

    student: Student
    optimizer: torch.optim.Optimizer
    teacher: Teacher | None = None
    teacher_optimizer: torch.optim.Optimizer | None = None
    val_stream: BatchStream | RepeatedBatch | WholeSplit | None = None
    clean_targets: Tensor | None = None
    keep_weight_grad: bool = False
    refill: BatchStream | None = None
    #: The norm of the gradient of the last real step (:meth:`step_on`), on the device;
    #: what ``TeachingContext.grad_norm`` shows the teacher.
    grad_norm: Tensor | None = field(default=None, init=False)
    #: Where the real steps note their metrics (``train/lr_scale``, the factor a lesson put
    #: on the rate): the teaching strategy's ``record``, which it sets.
    record: Callable[..., None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.val_stream, tuple | list):  # one batch (a Batch is a tuple too)
            self.val_stream = RepeatedBatch(self.val_stream)

    # ------------------------------------------------------------------ #
    # The student's state as parameter dicts
    # ------------------------------------------------------------------ #

    def params(self) -> Params:
        """The student's trainable parameters by name (the module's own tensors).

        Frozen parameters stay out: the functional passes take them from the module.
        """
        return {k: p for k, p in self.student.named_parameters() if p.requires_grad}

    @property
    def rule(self) -> UpdateRule:
        """The student optimizer's update rule, which virtual and unrolled steps take."""
        return rule_of(self.optimizer)

    @property
    def lr(self) -> float:
        """The student optimizer's learning rate now."""
        return self.optimizer.param_groups[0]["lr"]

    def inner_state(self) -> State:
        """The student optimizer's state (momentum, moments, ...) for :meth:`params`, detached."""
        return state_of(self.optimizer, self.rule, list(self.params().values()))

    def step_settings(
        self, params: Params, settings: StepSettings | None
    ) -> tuple[float | Tensor, list[Tensor | None] | None, Tensor | None]:
        """A lesson's step settings as the update rule takes them for ``params``: the learning
        rate (the schedule's, scaled), weight decay a parameter (None: the optimizer's), momentum.

        Raises:
            ValueError: the settings name weight decay for a parameter ``params`` do not hold.
        """
        if settings is None:
            return self.lr, None, None
        lr = self.lr if settings.lr_scale is None else self.lr * settings.lr_scale
        decay = None
        if settings.weight_decay is not None:
            unknown = sorted(set(settings.weight_decay) - set(params))
            if unknown:
                raise ValueError(
                    f"the lesson's weight_decay names {unknown}, which are not trainable "
                    f"parameters of the student; they are {sorted(params)}"
                )
            decay = [settings.weight_decay.get(k) for k in params]
        return lr, decay, settings.momentum

    def inner_step(
        self,
        params: Params,
        state: State,
        grads: Sequence[Tensor],
        settings: StepSettings | None = None,
    ) -> tuple[Params, State]:
        """One functional step of the student's optimizer at its current learning rate, under a
        lesson's step ``settings`` if given.

        ``grads`` follow the order of ``params``; differentiable throughout (in the
        settings too, when they carry the teacher's graph).
        """
        lr, decay, momentum = self.step_settings(params, settings)
        new, state = self.rule.update(list(params.values()), state, grads, lr, decay, momentum)
        return dict(zip(params, new, strict=True)), state

    def step_adjoint(
        self, params: Params, grads: Sequence[Tensor], settings: StepSettings, u: Params
    ) -> StepSettings:
        """(d theta' / d settings)^T u, theta' the optimizer's step from ``params`` on ``grads``
        under ``settings``: what the settings add to a one-step hypergradient
        (:meth:`~metateach.lesson.StepSettings.dot` of the lesson's settings with it).

        One vector-Jacobian product of the update in the settings alone, element-wise.
        """
        leaves = settings.detached()
        values = [v for v in (leaves.lr_scale, leaves.momentum) if v is not None]
        values += list((leaves.weight_decay or {}).values())
        for v in values:
            v.requires_grad_()
        with torch.enable_grad():
            new, _ = self.inner_step(
                {k: p.detach() for k, p in params.items()},
                self.inner_state(),
                [g.detach() for g in grads],
                leaves,
            )
            found = iter(
                autograd.grad(list(new.values()), values, [u[k] for k in new], allow_unused=True)
            )

        def adjoint(v: Tensor | None) -> Tensor | None:
            if v is None:
                return None
            g = next(found)
            return torch.zeros_like(v) if g is None else g

        lr_scale, momentum = adjoint(leaves.lr_scale), adjoint(leaves.momentum)
        decay = {k: adjoint(v) for k, v in (leaves.weight_decay or {}).items()}
        return StepSettings(lr_scale, decay or None, momentum)  # type: ignore[arg-type]

    def virtual_step(
        self, params: Params, grads: Sequence[Tensor], settings: StepSettings | None = None
    ) -> tuple[Params, Callable[[Params], Params]]:
        """theta', one step of the student's optimizer from ``params`` on ``grads`` (under a
        lesson's step ``settings``, as constants), and the pullback u -> (d theta' / d g)^T u
        of the step in the gradient.

        theta' is detached. The pullback is element-wise and cheap: -lr u for
        momentum SGD, one vector-Jacobian product of Adam's, RMSprop's, ... update
        for the others (:meth:`~metateach.optim.rules.UpdateRule.virtual_step`).
        """
        lr, decay, momentum = self.step_settings(params, settings)
        new, pullback = self.rule.virtual_step(
            list(params.values()), self.inner_state(), grads, lr, decay, momentum
        )
        return (
            dict(zip(params, new, strict=True)),
            lambda u: dict(zip(params, pullback([u[k] for k in params]), strict=True)),
        )

    @torch.no_grad()
    def write_back(self, params: Params, state: State) -> None:
        """Make functional results the student's real state: parameters and optimizer state."""
        own = self.params()
        for name, p in own.items():
            p.copy_(params[name])
        set_state(self.optimizer, self.rule, list(own.values()), state)

    # ------------------------------------------------------------------ #
    # Losses
    # ------------------------------------------------------------------ #

    def view(self, states: StudentStates, batch: Batch, context: TeachingContext) -> StudentView:
        """What the teacher sees of a forward pass: detached unless ``keep_weight_grad``."""
        losses = F.cross_entropy(states.logits, batch.y, reduction="none")
        view = StudentView(states.logits, losses, states.features, tuple(states.maps), context)
        if self.keep_weight_grad:
            return view
        return StudentView(
            view.logits.detach(),
            view.losses.detach(),
            view.features.detach(),
            tuple(m.detach() for m in view.maps),
            context,
        )

    def lesson(self, batch: Batch, view: StudentView, teacher_grad: bool) -> Lesson | None:
        """The teacher's lesson; with ``teacher_grad`` it keeps the graph to the teacher's parameters."""
        if self.teacher is None:
            return None
        with torch.set_grad_enabled(teacher_grad or self.keep_weight_grad):
            lesson = self.teacher(batch, view)
        if lesson is not None and lesson.step is not None and not self.teacher.teaches_step:
            # The methods that cannot differentiate a step's settings refuse by this declaration.
            raise TypeError(
                f"the lesson of {type(self.teacher).__name__} sets the optimizer's step: its class "
                "must declare teaches_step = True"
            )
        return lesson

    def train_loss(
        self,
        params: Params,
        batch: Batch,
        context: TeachingContext,
        *,
        real: bool,
        teacher_grad: bool = True,
    ) -> TrainPass:
        """The lesson-weighted training loss at ``params`` on ``batch``.

        ``real=True`` is the pass of a real step: BatchNorm updates its running
        statistics. Any other pass (virtual, replayed) runs on scratch buffers.
        """
        return self.taught(self.states(params, batch.x, real=real), batch, context, teacher_grad)

    def taught(
        self,
        states: StudentStates,
        batch: Batch,
        context: TeachingContext,
        teacher_grad: bool = True,
    ) -> TrainPass:
        """The lesson's loss on ``batch`` given the student's forward pass ``states``.

        Everything the teacher's parameters act in happens here: the view, the
        lesson, the loss function. With ``teacher_grad`` the loss keeps its
        graph to the teacher's parameters.
        """
        view = self.view(states, batch, context)
        lesson = self.lesson(batch, view, teacher_grad)
        return TrainPass(lesson_loss(lesson, states, batch.y), states, view, lesson)

    def taught_of(
        self, batch: Batch, context: TeachingContext
    ) -> Callable[[StudentStates], TrainPass]:
        """The teacher's lesson and its loss on ``batch`` as a function of the student's states (for
        :func:`~metateach.engine.forward_mode.mixed_gradient`), with their graph to the teacher's parameters."""
        return lambda states: self.taught(states, batch, context)

    def states(self, params: Params, x: Tensor, *, real: bool) -> StudentStates:
        """The student's forward pass at ``params``; ``real`` as in :meth:`train_loss`."""
        buffers = None if real else scratch_buffers(self.student)
        return student_forward(self.student, params, x, buffers)

    def forward(
        self, params: Params, batch: Batch, context: TeachingContext, *, real: bool
    ) -> tuple[StudentStates, StudentView]:
        """The student's states at ``params`` (with their graph) and the teacher's view of the pass.

        ``real`` as in :meth:`train_loss`.
        """
        states = self.states(params, batch.x, real=real)
        return states, self.view(states, batch, context)

    def val_loss(self, params: Params, batch: Batch) -> Tensor:
        """The outer objective: mean cross-entropy on a clean validation batch at ``params``.

        Computed as :func:`~metateach.lesson.lesson_loss` computes an unweighted
        loss (a share of the global batch's, when it is sharded over processes).

        BatchNorm normalizes with the batch's statistics, as in training, on
        scratch buffers; any dropout draws leave the run's random stream alone.
        """
        with self.own_rng():
            states = student_forward(self.student, params, batch.x, scratch_buffers(self.student))
        return lesson_loss(None, states.logits, batch.y)

    def own_rng(self, state: RNGState | None = None) -> contextlib.AbstractContextManager[None]:
        """A block whose random draws do not advance the run's stream (starting from ``state`` if given).

        Extra forward passes (virtual, validation, replay) run in one, so a
        teacher never changes the dropout masks of the student's real steps.
        """
        return _forked_rng(self.device, state)

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        """A block after which the student (parameters and buffers), its optimizer's state,
        the teacher's state and the random state are as they were before it."""
        student = {k: v.clone() for k, v in self.student.state_dict().items()}
        optimizer = copy.deepcopy(self.optimizer.state_dict())
        teacher = (
            None
            if self.teacher is None
            else {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
        )
        try:
            with self.own_rng():
                yield
        finally:
            self.student.load_state_dict(student)
            self.optimizer.load_state_dict(optimizer)
            if self.teacher is not None:
                self.teacher.load_state_dict(teacher)

    def rng_state(self) -> RNGState:
        """The random state now, to replay a forward pass with the same draws."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return RNGState(torch.get_rng_state(), cuda)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @timed("validation")
    def val_gradient(
        self,
        params: Params,
        batch: Batch | None = None,
        *,
        summed: bool = True,
    ) -> tuple[Params, Tensor]:
        """d L_val / d ``params`` and L_val (detached), on the validation stream's next draw.

        The draw is one batch, or the whole validation split in chunks
        (``val_batch_size: all``): the chunks' losses weigh by their sizes,
        and each chunk's gradient is taken on its own, so memory is that of
        one chunk. ``batch`` replaces the draw. Under data parallelism the
        results are summed over the processes, unless ``summed`` is false
        (for a caller that carries this process's share further back
        through a graph that sums across processes itself).
        """
        if batch is not None:
            chunks = [batch]
        elif self.val_stream is not None:
            chunks = self.val_stream.draw()
        else:
            raise RuntimeError("this problem has no validation stream; the teacher cannot learn")
        total = sum(len(chunk.y) for chunk in chunks)
        theta = list(params.values())
        grads: list[Tensor] = []
        losses: list[Tensor] = []
        for chunk in chunks:
            part = self.val_loss(params, chunk) * (len(chunk.y) / total)
            found = autograd.grad(part, theta)
            grads = [a + b for a, b in zip(grads, found, strict=True)] if grads else list(found)
            losses.append(part.detach())
        loss = torch.stack(losses).sum()
        if summed:
            *grads, loss = sum_gradients([*grads, loss])
        return dict(zip(params, grads, strict=True)), loss

    # ------------------------------------------------------------------ #
    # Steps
    # ------------------------------------------------------------------ #

    @timed("plain step")
    def real_step(self, batch: Batch, context: TeachingContext) -> Tensor:
        """One student step with the teacher's current lesson and the real optimizer.

        Under :class:`~metateach.optim.SAM` the gradient is taken a second
        time at w + epsilon, on the same batch under the same lesson, with the
        same dropout draws; that pass runs on scratch BatchNorm buffers, so
        the running statistics move once a step.
        """
        real = self.real_pass(batch, context, teacher_grad=False)
        self.descend(real.train, real.batch, real.rng)
        return self.statistics(real.train.view, real.batch, real.train.lesson, real.examined)

    def real_pass(self, batch: Batch, context: TeachingContext, teacher_grad: bool) -> RealPass:
        """A real step's forward pass under the teacher's lesson, for :meth:`descend`.

        With ``refill`` the teacher's choices fill a batch of their own
        (:func:`~metateach.engine.refill.refilled`), on which the pass is plain cross-entropy.
        """
        if self.refill is None:
            rng = self.step_rng()
            train = self.train_loss(
                self.params(), batch, context, real=True, teacher_grad=teacher_grad
            )
            log_prob = None if train.lesson is None else train.lesson.log_prob
            return RealPass(batch, train, log_prob, rng, len(batch.y))
        batch, log_prob, examined = refilled(self, batch, context, teacher_grad)
        rng = self.step_rng()  # after the teacher's passes: SAM replays the real one
        states, view = self.forward(self.params(), batch, context, real=True)
        train = TrainPass(lesson_loss(None, states, batch.y), states, view, None)
        return RealPass(batch, train, log_prob, rng, examined)

    def step_rng(self) -> RNGState | None:
        """Under SAM, the random state before a real step's forward pass (its second pass replays it)."""
        return self.rng_state() if isinstance(self.optimizer, SAM) else None

    def descend(self, first: TrainPass, batch: Batch, rng: RNGState | None) -> None:
        """The real optimizer's step from the real pass ``first``: plain, or SAM's two passes.

        ``rng`` is :meth:`step_rng` taken before ``first`` ran.
        """
        settings = first.step_settings
        if not isinstance(self.optimizer, SAM):
            self.apply_gradients(first.loss, settings=settings)
            return
        assert rng is not None, "a SAM step replays the first pass: take step_rng() before it"
        params = self.params()
        grads = sum_gradients(torch.autograd.grad(first.loss, list(params.values())))
        self.optimizer.perturb(grads)
        with self.own_rng(rng):
            states = student_forward(self.student, params, batch.x, scratch_buffers(self.student))
        second = lesson_loss(first.lesson, states, batch.y)
        grads = torch.autograd.grad(second, list(params.values()))
        self.optimizer.restore()
        self.step_on(grads, second, settings)

    def apply_gradients(
        self, loss: Tensor, retain_graph: bool = False, settings: StepSettings | None = None
    ) -> None:
        """Step the real optimizer on the student's gradient of ``loss`` (never touching the
        teacher's), under a lesson's step ``settings`` if given."""
        params = self.params()
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=retain_graph)
        self.step_on(grads, loss, settings)

    def step_on(
        self,
        grads: Sequence[Tensor],
        loss: Tensor | None = None,
        settings: StepSettings | None = None,
    ) -> None:
        """Step the real optimizer on ``grads``, in the order of :meth:`params`, under a
        lesson's step ``settings`` if given (their values: the real step is not differentiated).

        With the batch sharded over processes, ``grads`` (and ``loss``) are this
        process's share; their sums over the processes are the step's.

        Raises:
            NonFiniteStep: a gradient, or ``loss`` (the one they are of), holds inf
                or nan, or the gradient's norm overflows its dtype (the loss diverged);
                the parameters and the optimizer are left as they were.
        """
        *grads, total = sum_gradients([*grads, None if loss is None else loss.detach()])
        # One reduction over the gradients serves both the check and the teacher's
        # context: an inf or nan anywhere makes the norm (and the sum) inf or nan.
        norm = torch.nn.utils.get_total_norm([g for g in grads if g is not None])
        if not torch.isfinite(norm if total is None else norm + total):
            raise NonFiniteStep("the student's loss or gradient is not finite")
        self.grad_norm = norm
        params = self.params()
        for p, g in zip(params.values(), grads, strict=True):
            p.grad = g
        if settings is not None:
            step = self._base_optimizer().next_step = self._next_step(params, settings)
            if self.record is not None and settings.lr_scale is not None:
                self.record(**{"train/lr_scale": step.lr_scale})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _base_optimizer(self) -> RuleOptimizer:
        base = getattr(self.optimizer, "base", self.optimizer)  # SAM steps with its base
        if not isinstance(base, RuleOptimizer):
            raise TypeError(
                "a lesson's step settings need the student's optimizer built by "
                f"metateach.optim.build_optimizer, not a {type(base).__name__}"
            )
        return base

    def _next_step(self, params: Params, settings: StepSettings) -> NextStep:
        """``settings`` as numbers for the real optimizer's next step."""
        settings = settings.detached()
        _, decay, momentum = self.step_settings(params, settings)
        by_param = {
            p: float(d) for p, d in zip(params.values(), decay or [], strict=False) if d is not None
        }
        scale = 1.0 if settings.lr_scale is None else float(settings.lr_scale)
        return NextStep(scale, by_param, None if momentum is None else float(momentum))

    def teacher_step(self, grads: Sequence[Tensor | None]) -> bool:
        """Step the teacher's optimizer on ``grads``; a non-finite gradient skips the step (returns False)."""
        assert self.teacher_optimizer is not None and self.teacher is not None
        params = [p for p in self.teacher.parameters() if p.requires_grad]
        if not _all_finite(grads):
            return False
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.detach()
        self.teacher_optimizer.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)
        return True

    def teacher_params(self) -> list[Tensor]:
        assert self.teacher is not None
        return [p for p in self.teacher.parameters() if p.requires_grad]

    def statistics(
        self, view: StudentView, batch: Batch, lesson: Lesson | None, examined: int | None = None
    ) -> Tensor:
        """A step's :class:`~metateach.types.StepStats`, stacked on the device.
        The samples learned from are those the ``lesson`` kept
               (all of the batch without a mask); those examined, ``examined``
               (default: the batch; a refilled batch's candidates, see :meth:`refilled`).
        """
        predicted = view.logits.detach().argmax(dim=1)
        clean = batch.y if self.clean_targets is None else self.clean_targets[batch.index]
        learned = (
            lesson.mask.sum() if lesson is not None and lesson.mask is not None else batch.y.numel()
        )
        return StepStats.stack(
            view.losses.detach().sum(),
            (predicted == batch.y).sum(),
            (predicted == clean).sum(),
            learned,
            len(batch.y) if examined is None else examined,
            device=batch.y.device,
        )
