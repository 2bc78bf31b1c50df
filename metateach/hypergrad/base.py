"""Teaching strategies: how a training step goes, and when and how the teacher learns.

The trainer calls :meth:`TeachingStrategy.step` once per batch and knows
nothing else. :class:`StudentOnly` takes a plain student step with the
teacher's lesson (no teacher, a fixed rule, or a frozen teacher).
:class:`HypergradMethod` is the base of the methods that also update the
teacher by the gradient of the validation loss; each lives in a file of its
own and is registered by name in :data:`metateach.registry.HYPERGRADS`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor

from metateach.data import Batch
from metateach.distributed import sum_gradients
from metateach.hypergrad.functional import Params
from metateach.hypergrad.problem import BilevelProblem, RNGState, TrainPass
from metateach.lesson import lesson_loss
from metateach.teacher import TeachingContext

__all__ = ["TeachingStrategy", "StudentOnly", "HypergradMethod", "PerStepMethod", "UpdateMeter"]


class TeachingStrategy(ABC):
    """One student step per call, and whatever the teacher does around it."""

    #: Runs data-parallel (:mod:`metateach.distributed`): every gradient it
    #: forms from a batch is summed over the processes where the engine sums them.
    data_parallel: ClassVar[bool] = False

    def __init__(self, problem: BilevelProblem) -> None:
        self.problem = problem
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


class StudentOnly(TeachingStrategy):
    """Plain student steps under the teacher's lessons; the teacher does not learn."""

    data_parallel = True

    def step(self, batch: Batch, context: TeachingContext) -> Tensor:
        return self.problem.real_step(batch, context)


class HypergradMethod(TeachingStrategy):
    """A strategy that updates the teacher by a hypergradient every ``inner_steps`` student steps.

    Args:
        problem: the bilevel problem.
        inner_steps: K, student steps per teacher step.
        backprop_steps: B, how many of them the hypergradient reaches back through.
    """

    def __init__(self, problem: BilevelProblem, inner_steps: int, backprop_steps: int) -> None:
        super().__init__(problem)
        if not 1 <= backprop_steps <= inner_steps:
            raise ValueError(f"need 1 <= B <= K, got K={inner_steps}, B={backprop_steps}")
        self.inner_steps = inner_steps
        self.backprop_steps = backprop_steps
        self.position = 0  # student steps taken in the current window of K

    def state_dict(self) -> dict[str, Any]:
        stream = self.problem.val_stream
        return {
            **super().state_dict(),
            "position": self.position,
            "val_position": stream.position if stream else 0,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.position = state["position"]
        if self.problem.val_stream is not None:
            self.problem.val_stream.position = state["val_position"]

    def update_teacher(self, grads: Sequence[Tensor | None]) -> None:
        """Apply a hypergradient to the teacher, or count it as skipped when it is not finite.

        Under data parallelism ``grads`` are this process's share; their sum
        over the processes is the step, the same on every one.
        """
        grads = sum_gradients(grads)
        norm = torch.sqrt(
            sum((g.double().square().sum() for g in grads if g is not None), torch.zeros(()))
        )
        stepped = self.problem.teacher_step(grads)
        if stepped:
            self.record(**{"teacher/hypergrad_norm": float(norm)})
        self.count("teacher/skipped_steps", 0 if stepped else 1)

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
            train = problem.train_loss(params, batch, context, real=True)
            self.update_teacher(self.teacher_gradient(params, batch, train))
        lesson = problem.lesson(batch, train.view, teacher_grad=False)
        problem.apply_gradients(lesson_loss(lesson, train.logits, batch.y))
        return problem.statistics(train.view, batch, lesson)


class UpdateMeter:
    """Time and memory of a teacher update, which may span several student steps.

    Memory is counted in the tensors autograd saves for backward between
    :meth:`start` and :meth:`stop` (distinct storages), the same way on any
    device: ``teacher/graph_mb`` is all of them, ``teacher/graph_peak_mb``
    the most held at one moment (a graph's tensors stop counting when the
    graph is freed). On CUDA, ``teacher/peak_cuda_mb`` is the allocator's
    peak as well.
    """

    def __init__(self, student: torch.nn.Module) -> None:
        self.cuda = next(student.parameters()).is_cuda
        self._saved: dict[tuple[int, str], int] = {}  # storage -> bytes, every one saved
        self._held: dict[tuple[int, str], int] = {}  # storage -> saved tensors alive on it
        self._held_bytes = 0
        self._peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._start = 0.0

    def _pack(self, t: Tensor) -> _Held | Tensor:
        if t._is_zerotensor():  # forward mode's symbolic zeros own no memory
            return t
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        self._saved[key] = storage.nbytes()
        if key not in self._held:
            self._held[key] = 0
            self._held_bytes += storage.nbytes()
            self._peak_bytes = max(self._peak_bytes, self._held_bytes)
        self._held[key] += 1
        # Detached: a saved output held with its grad_fn would form a cycle
        # through C++ that no garbage collection frees. Autograd restores
        # the grad_fn on unpacking.
        return _Held(t.detach(), key, self)

    def _release(self, key: tuple[int, str]) -> None:
        self._held[key] -= 1
        if not self._held[key]:
            del self._held[key]
            self._held_bytes -= self._saved.get(key, 0)

    def start(self) -> None:
        self._saved.clear()
        self._held.clear()
        self._held_bytes = self._peak_bytes = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        self._hooks.__enter__()

    def stop(self) -> dict[str, float]:
        self._hooks.__exit__(None, None, None)
        metrics = {
            "teacher/graph_mb": sum(self._saved.values()) / 2**20,
            "teacher/graph_peak_mb": self._peak_bytes / 2**20,
        }
        if self.cuda:
            torch.cuda.synchronize()
            metrics["teacher/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        metrics["teacher/update_seconds"] = time.perf_counter() - self._start
        return metrics


class _Held:
    """A tensor autograd saved under an :class:`UpdateMeter`; it stops counting when the graph lets go."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: Tensor, key: tuple[int, str], meter: UpdateMeter) -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


def _unpack(packed: _Held | Tensor) -> Tensor:
    return packed.tensor if isinstance(packed, _Held) else packed
