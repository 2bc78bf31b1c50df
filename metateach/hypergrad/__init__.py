"""How a teacher's parameters get their gradient: one file a method, registered by name.

========================  =====================================================
``unrolled``              K student steps, backpropagate through the last B
``reversible``            the same gradient, running momentum SGD backwards (O(1) graphs)
``lookahead``             one virtual step (Meta-Weight-Net, Learning-to-Reweight)
``finite_difference``     ``lookahead`` with DARTS's finite difference (first derivatives only)
``implicit``              the implicit function theorem, CG or Neumann series
``learned_optimizer``     rounds of ``unrolled``; a learned optimizer (L2T-DLN's LSTM) writes the lesson
========================  =====================================================

The problem they differentiate and the bases they share are the engine's
(:mod:`metateach.engine`); teachers that sample their lessons learn by
REINFORCE instead (:class:`~metateach.engine.policy_gradient.Reinforce`).

Every method's :meth:`~metateach.engine.strategy.HypergradMethod.hypergradient`
returns the hypergradient over a span of batches without stepping anything;
:func:`~metateach.hypergrad.check.check_hypergradient` compares it with central
differences of the validation loss.

:func:`metateach.teaching.build_teaching` turns a configured teacher into the
:class:`~metateach.engine.strategy.TeachingStrategy` the trainer runs.
"""

from __future__ import annotations

from metateach.hypergrad.check import HypergradientCheck, check_hypergradient
from metateach.hypergrad.example_gradient import ExampleGradients, example_gradient
from metateach.hypergrad.finite_difference import FiniteDifference
from metateach.hypergrad.implicit import Implicit
from metateach.hypergrad.learned_optimizer import LearnedOptimizer
from metateach.hypergrad.lookahead import Lookahead
from metateach.hypergrad.reversible import Reversible
from metateach.hypergrad.unrolled import Unrolled

__all__ = [
    "ExampleGradients",
    "example_gradient",
    "FiniteDifference",
    "HypergradientCheck",
    "Implicit",
    "LearnedOptimizer",
    "Lookahead",
    "Reversible",
    "check_hypergradient",
    "Unrolled",
]
