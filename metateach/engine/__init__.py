"""The bilevel engine: the student's problem, and the strategies that drive a training step.

=============================  ==================================================
:mod:`~.problem`               ``BilevelProblem``: the student, its update rule,
                               the teacher, real and virtual steps, forward mode
:mod:`~.strategy`              ``TeachingStrategy`` (one step, and when the
                               teacher learns), ``StudentOnly``, and the base of
                               the hypergradient methods (:mod:`metateach.hypergrad`)
:mod:`~.forward_mode`          the teacher term of a differentiated step, by forward mode
:mod:`~.tangent`               the tangent pass that reuses a recorded forward pass
:mod:`~.second_order`          batch norm with a fused double backward, for steps
                               differentiated twice
:mod:`~.refill`                L2T's refill: batches of the samples a filter keeps
:mod:`~.meter`                 the memory a teacher step's graphs hold
:mod:`~.peer`                  a peer student that selects for the student (co-teaching, SRIT)
:mod:`~.policy_gradient`       REINFORCE over whole runs (L2T's data filter)
=============================  ==================================================

Which strategy drives a teacher is its declaration's to say (:mod:`metateach.learning`).
"""

from __future__ import annotations

from metateach.engine.meter import UpdateMeter
from metateach.engine.peer import PeerTeaching
from metateach.engine.policy_gradient import Reinforce
from metateach.engine.problem import BilevelProblem, TrainPass
from metateach.engine.strategy import (
    Differentiates,
    HypergradMethod,
    PerStepMethod,
    StudentOnly,
    TeachingStrategy,
)
from metateach.types import RNGState

__all__ = [
    "BilevelProblem",
    "Differentiates",
    "HypergradMethod",
    "PeerTeaching",
    "PerStepMethod",
    "RNGState",
    "Reinforce",
    "StudentOnly",
    "TeachingStrategy",
    "TrainPass",
    "UpdateMeter",
]
