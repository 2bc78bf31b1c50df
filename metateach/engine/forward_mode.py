"""Forward mode through the student: the mixed second derivative of a training loss along a
direction, without a second-order backward through the network.

Every differentiated step whose gradient a hypergradient needs in one direction
(lookahead's only step, the first step of an ``unrolled`` or ``reversible``
window) takes its teacher term here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch.autograd.forward_ad as fwAD
from torch import Tensor, autograd

from metateach.engine.phases import timed
from metateach.engine.tangent import ForwardRecord, ReplayMismatch
from metateach.student import StudentStates
from metateach.types import Params, RNGState

if TYPE_CHECKING:
    from metateach.engine.problem import BilevelProblem, TrainPass
    from metateach.lesson import StepSettings

__all__ = ["mixed_gradient"]


@timed("tangent pass")
def mixed_gradient(
    problem: BilevelProblem,
    x: Tensor,
    taught_of: Callable[[StudentStates], TrainPass | Tensor],
    params: Params,
    direction: Mapping[str, Tensor],
    targets: Sequence[Tensor],
    rng: RNGState | None,
    record: ForwardRecord | None = None,
    step_adjoint: StepSettings | None = None,
) -> tuple[Tensor | None, ...]:
    """d/d ``targets`` of <grad_theta L(theta), ``direction``> (+ <s, ``step_adjoint``>) at
    theta = ``params``.

    L(theta) = ``taught_of(s(theta))``, s the student's states (logits,
    features, maps) on the inputs ``x``: a training pass's loss, or a loss
    alone; s the pass's lesson's step settings
    (:class:`~metateach.lesson.StepSettings`), when it has them and a
    ``step_adjoint`` (what the step's hypergradient weighs them by) is given. The mixed second derivative of a
    training loss applied to a vector, in two parts, without a second-order
    backward through the student:

    1. One forward-mode pass of the student, theta carrying the tangent
       ``direction``, gives the states s and their tangents
       s' = (ds/dtheta) ``direction`` for the whole batch at once.
    2. The loss as a function of the states, which holds everything the
       targets act in (the view, the lesson, its loss function), is
       differentiated twice in reverse mode: <grad_s L(s), s'> is L's
       directional derivative along ``direction``, and its gradient in the
       targets is the result.

    Reverse mode never runs through a forward-mode rule. Not every one of
    PyTorch's is safe to differentiate in reverse: log_softmax's modifies a
    tensor it saved (pytorch/pytorch#162350), and a loss function with the
    teacher's parameters before a softmax (a learned temperature) got a
    wrong hypergradient that way. The second-order part runs on the
    states, not the network: it costs what the lesson costs.

    The pass starts from the random state ``rng`` of the pass it repeats,
    so that dropout draws the same masks, and runs on scratch BatchNorm buffers.
    With the ``record`` of that pass (:func:`~metateach.engine.tangent.recording`),
    its convolutions, linear maps and batch norms are not computed again: the
    pass computes their tangents only (:mod:`metateach.engine.tangent`). A
    record the pass does not match is set aside with a warning, and the pass
    runs in full.
    """
    with fwAD.dual_level(), warnings.catch_warnings():
        # On first use, forward mode registers some of its rules with torch.jit.script,
        # which warns of its own deprecation: PyTorch's business, not the user's.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        duals = {k: fwAD.make_dual(p.detach(), direction[k].detach()) for k, p in params.items()}
        states, mismatch = None, None
        if record is not None:
            try:
                with problem.own_rng(rng), record.replay():
                    states = problem.states(duals, x, real=False)
            except ReplayMismatch as error:
                mismatch = error
        if states is None:
            with problem.own_rng(rng):
                states = problem.states(duals, x, real=False)
        head = () if states.head_weight is None else (states.head_weight,)
        unpacked = [
            fwAD.unpack_dual(s) for s in (states.logits, states.features, *head, *states.maps)
        ]
        leaves = [u.primal.detach().requires_grad_() for u in unpacked]
        tangents = [None if u.tangent is None else u.tangent.detach() for u in unpacked]
    if mismatch is not None:
        warnings.warn(
            f"the tangent pass could not reuse the training forward ({mismatch}); it ran "
            "forward mode in full",
            RuntimeWarning,
            stacklevel=2,
        )
    maps = tuple(leaves[2 + len(head) :])
    taught = taught_of(StudentStates(leaves[0], leaves[1], maps, leaves[2] if head else None))
    loss, lesson = (taught, None) if isinstance(taught, Tensor) else (taught.loss, taught.lesson)
    grads = autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    terms = [
        (g * t).sum()
        for g, t in zip(grads, tangents, strict=True)
        if g is not None and t is not None
    ]
    slope = sum(terms)
    if step_adjoint is not None and lesson is not None and lesson.step is not None:
        slope = slope + lesson.step.dot(step_adjoint)
    if not isinstance(slope, Tensor) or not slope.requires_grad:  # no target acts here
        return (None,) * len(targets)
    return autograd.grad(slope, list(targets), allow_unused=True)
