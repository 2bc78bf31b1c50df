"""Implicit differentiation through the student's optimum.

References:
    Lorraine, Vicol and Duvenaud, "Optimizing millions of hyperparameters by
    implicit differentiation", AISTATS 2020 (Neumann series).
    Rajeswaran, Finn, Kakade and Levine, "Meta-learning with implicit
    gradients", NeurIPS 2019 (conjugate gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import torchopt
from torch import Tensor, autograd

from metateach.data import Batch
from metateach.distributed import holds_constant_terms, sum_gradients
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.strategy import Differentiates, PerStepMethod
from metateach.functional import dot
from metateach.optim.rules import UpdateRule, decayed_gradients
from metateach.registry import HYPERGRADS
from metateach.teacher import Teacher
from metateach.types import Params

__all__ = ["Implicit"]

SOLVERS = ("cg", "neumann")

#: Why ``implicit`` refuses an optimizer (``optim.name``).
REFUSAL = (
    "teacher.hypergrad.method=implicit differentiates the minimizer of the training loss plus "
    "coupled weight decay, where the student's optimizer comes to rest; optim.name={name} with "
    "decoupled weight decay comes to rest elsewhere: set optim.weight_decay=0, use adam (coupled "
    "decay), or another method (lookahead, unrolled)"
)


@HYPERGRADS.register("implicit")
class Implicit(PerStepMethod):
    """Treat the student as at its optimum theta*(omega) and apply the implicit function theorem.

    With H = d^2 L_train / d theta^2 (the optimizer's coupled weight decay included:
    the stationary points of the objective are where it comes to rest, for
    SGD, Adam, RMSprop, ...; AdamW's decoupled decay is refused) and
    v = grad L_val(theta), the hypergradient is

        -d/d omega <grad_theta L_train(theta, omega), H^{-1} v>,

    H^{-1} v solved with Hessian-vector products by TorchOpt's linear solvers:
    conjugate gradient (``solver: cg``, optionally damped by ``damping``, until
    its residual falls to ``tolerance``) or a truncated Neumann series
    (``solver: neumann``, step ``alpha``). Exact at an optimum with an exact
    solve; an approximation elsewhere.

    Args:
        solver: ``cg`` or ``neumann``.
        iterations: solver iterations (cg: at most).
        damping: cg only: solve (H + damping I) x = v, for Hessians that are not positive definite.
        tolerance: cg only: stop once ||residual|| <= tolerance ||v|| (TorchOpt's default, 1e-5).
        alpha: neumann only: H^{-1} ~ alpha sum_j (I - alpha H)^j; needs alpha < 2 / lambda_max(H).

    Runs data-parallel: v and every Hessian-vector product are summed over
    the processes (each holds its share of the training loss, the weight
    decay in rank 0's), so the solver runs alike everywhere.
    """

    data_parallel = True
    differentiates = Differentiates.OPTIMUM
    differentiates_twice = True  # Hessian-vector products through the forward pass

    @classmethod
    def refuses(cls, teacher: Teacher | None) -> str | None:
        if teacher is not None and teacher.teaches_step:
            return (
                f"{type(teacher).__name__} sets the optimizer's steps, and implicit differentiates "
                "the optimum the steps reach, not the steps: use unrolled, reversible, lookahead "
                "or finite_difference"
            )
        return super().refuses(teacher)

    @classmethod
    def refuses_rule(cls, rule: UpdateRule) -> str | None:
        return REFUSAL.format(name=rule.name) if rule.stationary_decay is None else None

    def __init__(
        self,
        problem: BilevelProblem,
        inner_steps: int = 1,
        backprop_steps: int = 1,
        solver: str = "cg",
        iterations: int = 10,
        damping: float = 0.0,
        tolerance: float = 1e-5,
        alpha: float = 0.01,
    ) -> None:
        super().__init__(problem, inner_steps, backprop_steps)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if solver == "cg":
            self.solve = torchopt.linear_solve.solve_cg(
                maxiter=iterations, ridge=damping or None, rtol=tolerance
            )
        else:
            self.solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=iterations, alpha=alpha)

    def teacher_gradient(
        self, params: Params, batch: Batch, train: TrainPass
    ) -> Sequence[Tensor | None]:
        problem = self.problem
        theta = list(params.values())
        v, val_loss = problem.val_gradient(params)
        grads = autograd.grad(train.loss, theta, create_graph=True, retain_graph=True)
        decay = problem.rule.stationary_decay if holds_constant_terms() else 0.0
        decayed = decayed_gradients(dict(zip(params, grads, strict=True)), params, decay)

        def hessian_vector(x: Params) -> Params:
            products = autograd.grad(dot(decayed, x), theta, retain_graph=True)
            return dict(zip(params, sum_gradients(products), strict=True))

        x = self.solve(hessian_vector, v)
        x = {k: t.detach() for k, t in x.items()}
        self.record(**{"teacher/val_loss": float(val_loss.detach())})
        mixed = autograd.grad(
            dot(decayed, x), problem.teacher_params(), retain_graph=True, allow_unused=True
        )
        return [None if g is None else -g for g in mixed]
