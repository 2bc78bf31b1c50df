"""A tiny float64 bilevel problem on which hypergradients can be checked exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metateach.data import Batch, RepeatedBatch
from metateach.engine import BilevelProblem
from metateach.lesson import Lesson, lesson_loss
from metateach.models import create_model
from metateach.student import Student
from metateach.teacher import Hypergradient, StudentView, Teacher, TeachingContext

CLASSES = 3
SHAPE = (1, 3, 3)


class FeatureTeacher(Teacher):
    """w = sigmoid(a . features + E[label] + b): reads the student's internal state, like the deep-interaction teacher."""

    learns = Hypergradient("unrolled")

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.a = nn.Parameter(0.3 * torch.randn(feature_dim, generator=g, dtype=torch.float64))
        self.embedding = nn.Parameter(0.3 * torch.randn(CLASSES, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.2, dtype=torch.float64))

    def forward(self, batch: Batch, view: StudentView) -> Lesson:
        score = view.features @ self.a + self.embedding[batch.y] + self.b
        return Lesson.weighted(torch.sigmoid(score))


def exercised(teacher: Teacher) -> Teacher:
    """``teacher`` with its zero-initialized parameters and state (an LSTM's memory) moved, as
    after some teaching, so that every gradient path carries a signal."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in [*teacher.parameters(), *teacher.buffers()]:
            if t.is_floating_point() and not t.any():
                t.add_(0.3 * torch.randn(t.shape, generator=g, dtype=t.dtype))
    return teacher


def make_batch(n: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, *SHAPE, generator=g, dtype=torch.float64),
        torch.randint(0, CLASSES, (n,), generator=g),
        torch.arange(n),
    )


def context(step: int = 0) -> TeachingContext:
    return TeachingContext(step, 0, 100, torch.tensor(1.0, dtype=torch.float64), 0.5)


class Setup:
    """A student (MLP or a BatchNorm ResNet), a FeatureTeacher, batches, and a fresh problem on demand."""

    def __init__(
        self,
        model: str = "mlp",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        teacher: Callable[[Student], Teacher] | None = None,
        nesterov: bool = False,
        dropout: float = 0.0,
        hidden: tuple[int, ...] = (6, 5),
    ) -> None:
        torch.manual_seed(0)
        kwargs = {"hidden": list(hidden), "dropout": dropout} if model == "mlp" else {}
        self.shape = SHAPE if model == "mlp" else (1, 8, 8)
        self.student = create_model(model, CLASSES, self.shape, kwargs).double()
        self.teacher = exercised(
            (teacher or (lambda s: FeatureTeacher(s.feature_dim)))(self.student).double()
        )
        self.settings = (lr, momentum, weight_decay)
        self.nesterov = nesterov
        self.batches = [self._batch(8, 100 + i) for i in range(12)]
        self.val = self._batch(10, 7)
        self.optimizer = self._optimizer()
        # Warm up, so that the momentum buffers are not zero when a window starts.
        problem = self.problem()
        for i in range(2):
            problem.real_step(self.batches[-1 - i], context())
        self.snapshot = self.state()

    def _batch(self, n: int, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, *self.shape, generator=g, dtype=torch.float64)
        return Batch(x, torch.randint(0, CLASSES, (n,), generator=g), torch.arange(n))

    def _optimizer(self) -> torch.optim.SGD:
        lr, momentum, wd = self.settings
        return torch.optim.SGD(
            self.student.parameters(),
            lr=lr,
            momentum=momentum,
            weight_decay=wd,
            nesterov=self.nesterov,
        )

    def problem(self, keep_weight_grad: bool = False) -> BilevelProblem:
        # The teacher's optimizer has lr 0: a teacher step leaves it as it is, so runs can be compared.
        return BilevelProblem(
            student=self.student,
            optimizer=self.optimizer,
            teacher=self.teacher,
            teacher_optimizer=torch.optim.SGD(self.teacher.parameters(), lr=0.0),
            val_stream=RepeatedBatch(self.val),
            clean_targets=torch.zeros(64, dtype=torch.long),
            keep_weight_grad=keep_weight_grad,
        )

    def state(self) -> dict:
        """Everything a run changes: student weights and buffers, momentum, teacher."""
        momentum = {
            k: self.optimizer.state[p]["momentum_buffer"].clone()
            for k, p in self.student.named_parameters()
            if p.requires_grad
        }
        return {
            "student": {k: v.clone() for k, v in self.student.state_dict().items()},
            "momentum": momentum,
            "teacher": {k: v.clone() for k, v in self.teacher.state_dict().items()},
        }

    def reset(self, teacher_shift: torch.Tensor | None = None) -> None:
        """Back to the snapshot; ``teacher_shift`` is added to the teacher's flattened parameters."""
        self.student.load_state_dict(self.snapshot["student"])
        for k, p in self.student.named_parameters():
            if k in self.snapshot["momentum"]:
                self.optimizer.state[p]["momentum_buffer"] = self.snapshot["momentum"][k].clone()
        self.teacher.load_state_dict(self.snapshot["teacher"])
        if teacher_shift is not None:
            with torch.no_grad():
                flat = nn.utils.parameters_to_vector(self.teacher.parameters()) + teacher_shift
                nn.utils.vector_to_parameters(flat, self.teacher.parameters())

    def val_loss_after(
        self,
        steps: int,
        keep_weight_grad: bool = False,
        shift: torch.Tensor | None = None,
        frozen: list[StudentView] | None = None,
    ) -> tuple[float, list[StudentView]]:
        """The function the hypergradient differentiates, computed independently of the engine.

        ``steps`` plain steps with torch's SGD under the (fixed) teacher's
        lessons, then the validation loss. The teacher sees the student as it
        is when ``keep_weight_grad``; otherwise it sees ``frozen`` views (the
        base run's, detached), which is what dw/dtheta = 0 means. Returns the
        loss and the views each step showed.
        """
        self.reset(shift)
        shown = []
        for t in range(steps):
            batch = self.batches[t]
            states = self.student(batch.x, return_states=True)
            losses = F.cross_entropy(states.logits, batch.y, reduction="none")
            live = StudentView(states.logits, losses, states.features, states.maps, context(t))
            if keep_weight_grad:
                view = live
            elif frozen is not None:
                view = frozen[t]
            else:
                view = StudentView(
                    live.logits.detach(), losses.detach(), live.features.detach(),
                    tuple(m.detach() for m in live.maps), live.context,
                )  # fmt: skip
            shown.append(view)
            loss = lesson_loss(self.teacher(batch, view), states.logits, batch.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            return float(F.cross_entropy(self.student(self.val.x), self.val.y)), shown

    def finite_difference(
        self, steps: int, keep_weight_grad: bool = False, h: float = 1e-6
    ) -> torch.Tensor:
        """Central differences of :meth:`val_loss_after` in each teacher parameter."""
        _, base_views = self.val_loss_after(steps, keep_weight_grad)
        frozen = None if keep_weight_grad else base_views
        n = sum(p.numel() for p in self.teacher.parameters())
        grad = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            e = torch.zeros(n, dtype=torch.float64)
            e[i] = h
            plus, _ = self.val_loss_after(steps, keep_weight_grad, e, frozen)
            minus, _ = self.val_loss_after(steps, keep_weight_grad, -e, frozen)
            grad[i] = (plus - minus) / (2 * h)
        self.reset()
        return grad

    def hypergradient(
        self, method: Callable[[BilevelProblem], object], steps: int, keep_weight_grad: bool = False
    ) -> torch.Tensor:
        """Run ``steps`` steps of a method from the snapshot; the hypergradient of its last teacher update."""
        self.reset()
        strategy = method(self.problem(keep_weight_grad))
        captured: list[torch.Tensor] = []
        original = strategy.update_teacher

        def capture(grads: list) -> None:
            captured.append(torch.cat([g.reshape(-1) for g in grads]))
            original(grads)

        strategy.update_teacher = capture  # type: ignore[method-assign]
        for t in range(steps):
            strategy.step(self.batches[t], context(t))
        assert captured, "the method made no teacher update"
        return captured[-1]
