"""How a teacher's parameters get their gradient: one file a method, registered by name.

========================  =====================================================
``unrolled``              K student steps, backpropagate through the last B
``reversible``            the same gradient, running momentum SGD backwards (O(1) graphs)
``lookahead``             one virtual step (Meta-Weight-Net, Learning-to-Reweight)
``finite_difference``     ``lookahead`` with DARTS's finite difference (first derivatives only)
``implicit``              the implicit function theorem, CG or Neumann series
``learned_optimizer``     rounds of ``unrolled``; a learned optimizer (L2T-DLN's LSTM) writes the lesson
========================  =====================================================

Teachers that sample their lessons learn by REINFORCE instead
(:class:`~metateach.hypergrad.policy_gradient.Reinforce`).

:func:`metateach.teaching.build_teaching` turns a configured teacher into the
:class:`~metateach.hypergrad.base.TeachingStrategy` the trainer runs.
"""

from __future__ import annotations

from metateach.hypergrad import (  # noqa: F401
    finite_difference,
    implicit,
    learned_optimizer,
    lookahead,
    reversible,
    unrolled,
)
from metateach.hypergrad.base import (
    HypergradMethod,
    PerStepMethod,
    StudentOnly,
    TeachingStrategy,
    UpdateMeter,
)
from metateach.hypergrad.example_gradient import ExampleGradients, example_gradient
from metateach.hypergrad.functional import (
    momentum_sgd_step,
    recover_momentum,
    reverse_momentum_sgd,
    student_forward,
)
from metateach.hypergrad.policy_gradient import Reinforce
from metateach.hypergrad.problem import BilevelProblem, SGDSettings, TrainPass

__all__ = [
    "BilevelProblem",
    "ExampleGradients",
    "example_gradient",
    "HypergradMethod",
    "PerStepMethod",
    "Reinforce",
    "SGDSettings",
    "StudentOnly",
    "TeachingStrategy",
    "TrainPass",
    "UpdateMeter",
    "momentum_sgd_step",
    "recover_momentum",
    "reverse_momentum_sgd",
    "student_forward",
]
