"""The student's optimizers as pure, differentiable update rules.

An :class:`UpdateRule` maps ``(params, state, grads, lr)`` to ``(params,
state)`` without touching its inputs. The engine calls the same rule for a
real step (:class:`RuleOptimizer`, a ``torch.optim.Optimizer`` around it),
a virtual step and every step of an unrolled window, so a teacher
differentiates exactly the optimizer the student follows. Two kinds:

* :class:`MomentumSGD`, PyTorch's momentum SGD operation for operation
  (bit for bit ``torch.optim.SGD``) and, without Nesterov, invertible: what
  ``reversible`` runs backwards;
* :class:`TorchoptRule`, one of TorchOpt's functional optimizers
  (``torchopt.adam``, ``adamw``, ``rmsprop``, ``adagrad``, ``adadelta``):
  TorchOpt's own arithmetic, differentiable in everything.

A rule's state is kept per parameter in ``torch.optim``'s layout (the same
keys as the ``torch.optim`` class it stands for: ``momentum_buffer``;
``step``, ``exp_avg``, ``exp_avg_sq``; ...), so checkpoints, ``state_dict``
and SAM treat a :class:`RuleOptimizer` as any optimizer, and its state
loads into the ``torch.optim`` class itself, which is how the hypergradient
check re-runs the steps independently (:mod:`metateach.hypergrad.replay`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor

__all__ = [
    "UpdateRule",
    "MomentumSGD",
    "TorchoptRule",
    "RuleOptimizer",
    "NextStep",
    "rule_of",
    "state_of",
    "reference_copy",
    "set_state",
    "momentum_sgd_step",
    "reverse_momentum_sgd",
    "recover_momentum",
    "decayed_gradients",
]

Params = dict[str, Tensor]
State = Any
Slots = list[dict[str, Tensor]]


def decayed_gradients(
    grads: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    weight_decay: float | Tensor | Mapping[str, float | Tensor],
) -> Params:
    """g + weight_decay * theta, PyTorch's coupled weight decay (``grad.add(param, alpha=wd)``).

    ``weight_decay`` is one value, or one per parameter name; a tensor value
    (a teacher's, with its graph) is differentiated through.
    """
    per = weight_decay if isinstance(weight_decay, Mapping) else dict.fromkeys(grads, weight_decay)
    return {k: _decayed(g, params[k], per[k]) for k, g in grads.items()}


def _decayed(g: Tensor, p: Tensor, weight_decay: float | Tensor) -> Tensor:
    if isinstance(weight_decay, Tensor):
        return g + weight_decay * p
    return g if weight_decay == 0 else g.add(p, alpha=weight_decay)


def _scaled_step(p: Tensor, direction: Tensor, lr: float | Tensor) -> Tensor:
    """p - lr * direction; a float rate in PyTorch's own arithmetic (``add(alpha=-lr)``)."""
    return p - lr * direction if isinstance(lr, Tensor) else p.add(direction, alpha=-lr)


def momentum_sgd_step(
    params: Mapping[str, Tensor],
    momentum: Mapping[str, Tensor | None],
    grads: Mapping[str, Tensor],
    lr: float | Tensor,
    momentum_coef: float | Tensor,
    weight_decay: float | Tensor | Mapping[str, float | Tensor],
    nesterov: bool = False,
) -> tuple[Params, Params]:
    """One step of momentum SGD in PyTorch's convention; returns (new params, new momentum).

    d = g + lambda theta;  v' = mu v + d  (v' = d on the first step);  theta' = theta - lr v'
    (with ``nesterov``, theta' = theta - lr (d + mu v')).

    This is Eq. 2 of the deep-interaction paper. A ``None`` momentum entry
    means the first step. ``lr``, ``momentum_coef`` and the weight decay (one,
    or one per parameter name) may be tensors with a teacher's graph (a lesson's
    :class:`~metateach.lesson.StepSettings`). Differentiable in everything when
    the inputs carry graphs.
    """
    new_params: Params = {}
    new_momentum: Params = {}
    for name, d in decayed_gradients(grads, params, weight_decay).items():
        v = momentum.get(name)
        if _is_zero(momentum_coef):
            v_new = d
        elif v is None:
            v_new = d.clone()
        else:
            v_new = v.mul(momentum_coef).add(d)
        new_momentum[name] = v_new
        direction = v_new
        if nesterov:
            direction = (
                d + momentum_coef * v_new
                if isinstance(momentum_coef, Tensor)
                else d.add(v_new, alpha=momentum_coef)
            )
        new_params[name] = _scaled_step(params[name], direction, lr)
    return new_params, new_momentum


def _is_zero(value: float | Tensor) -> bool:
    return not isinstance(value, Tensor) and value == 0


def reverse_momentum_sgd(
    params_next: Mapping[str, Tensor], momentum_next: Mapping[str, Tensor], lr: float
) -> Params:
    """theta_t = theta_{t+1} + lr * v_{t+1}: the parameters before a momentum-SGD step."""
    return {k: params_next[k].add(momentum_next[k], alpha=lr) for k in params_next}


def recover_momentum(
    momentum_next: Mapping[str, Tensor], decayed_grads: Mapping[str, Tensor], momentum_coef: float
) -> Params:
    """v_t = (v_{t+1} - d_t) / mu: the momentum before a step, given the step's decayed gradient d_t."""
    return {k: (momentum_next[k] - decayed_grads[k]) / momentum_coef for k in momentum_next}


class UpdateRule(ABC):
    """A differentiable optimizer step: ``update(params, state, grads, lr) -> (params, state)``.

    Parameters, gradients and the returned parameters are sequences in one
    order; the state is the rule's own structure over that order.
    """

    #: The name it is registered as (``optim.name``).
    name: str = ""

    @abstractmethod
    def update(
        self,
        params: Sequence[Tensor],
        state: State,
        grads: Sequence[Tensor],
        lr: float | Tensor,
        decay: Sequence[float | Tensor | None] | None = None,
        momentum: float | Tensor | None = None,
    ) -> tuple[list[Tensor], State]:
        """One step at learning rate ``lr``; differentiable when the inputs carry graphs.

        ``decay`` (one entry a parameter, None: the rule's own weight decay) and
        ``momentum`` replace the rule's settings for this step: a lesson's
        :class:`~metateach.lesson.StepSettings`, and like ``lr`` they may be
        tensors with a teacher's graph. A rule refuses a setting it does not have.
        """

    def virtual_step(
        self,
        params: Sequence[Tensor],
        state: State,
        grads: Sequence[Tensor],
        lr: float | Tensor,
        decay: Sequence[float | Tensor | None] | None = None,
        momentum: float | Tensor | None = None,
    ) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Tensor]]]:
        """theta' = the step (detached) and its pullback u -> (d theta' / d g)^T u in the gradient.

        One vector-Jacobian product of the update, element-wise; a rule whose
        step is linear in g gives its closed form instead. The settings are
        taken as constants (detached).
        """
        lr, decay, momentum = _detached(lr), _detached(decay), _detached(momentum)
        leaves = [g.detach().requires_grad_() for g in grads]
        with torch.enable_grad():
            new, _ = self.update([p.detach() for p in params], state, leaves, lr, decay, momentum)

        def pullback(u: Sequence[Tensor]) -> list[Tensor]:
            found = torch.autograd.grad(new, leaves, list(u), allow_unused=True)
            return [
                torch.zeros_like(g) if a is None else a for g, a in zip(leaves, found, strict=True)
            ]

        return [t.detach() for t in new], pullback

    @abstractmethod
    def to_slots(self, state: State) -> Slots:
        """The state as one dict per parameter, in the ``torch.optim`` class's keys."""

    @abstractmethod
    def from_slots(self, slots: Sequence[Mapping[str, Tensor]], params: Sequence[Tensor]) -> State:
        """The state from per-parameter dicts (empty: the parameter has taken no step)."""

    @abstractmethod
    def reference(self, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimizer this rule equals, for checks that re-run steps without it."""

    @property
    def invertible(self) -> bool:
        """Whether a step can be undone from the parameters and state after it (``reversible``)."""
        return False

    @property
    def stationary_decay(self) -> float | None:
        """lambda such that the rule's fixed points are the stationary points of
        L(theta) + lambda / 2 ||theta||^2 (coupled weight decay), for ``implicit``; None when
        they are no loss's stationary points (AdamW's decoupled decay)."""
        return None


class MomentumSGD(UpdateRule):
    """PyTorch's momentum SGD (Eq. 2 of the deep-interaction paper): :func:`momentum_sgd_step`.

    The state is each parameter's momentum buffer, None before its first step.
    """

    name = "sgd"

    def __init__(self, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs optim.momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def update(
        self,
        params: Sequence[Tensor],
        state: State,
        grads: Sequence[Tensor],
        lr: float | Tensor,
        decay: Sequence[float | Tensor | None] | None = None,
        momentum: float | Tensor | None = None,
    ) -> tuple[list[Tensor], State]:
        mu = self.momentum if momentum is None else momentum
        per = [self.weight_decay if d is None else d for d in decay or [None] * len(params)]
        new, buffers = momentum_sgd_step(
            dict(enumerate(params)),
            dict(enumerate(state)),
            dict(enumerate(grads)),
            lr,
            mu,
            dict(enumerate(per)),
            self.nesterov,
        )
        kept = [None] * len(new) if _is_zero(mu) else list(buffers.values())
        return list(new.values()), kept

    def virtual_step(
        self,
        params: Sequence[Tensor],
        state: State,
        grads: Sequence[Tensor],
        lr: float | Tensor,
        decay: Sequence[float | Tensor | None] | None = None,
        momentum: float | Tensor | None = None,
    ) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], list[Tensor]]]:
        """d theta' / d g = -lr I, or -lr (1 + mu) I with Nesterov's momentum: no graph needed."""
        lr, momentum = _detached(lr), _detached(momentum)
        with torch.no_grad():
            new, _ = self.update(params, state, grads, lr, _detached(decay), momentum)
        mu = self.momentum if momentum is None else momentum
        scale = -lr * (1 + mu) if self.nesterov else -lr
        return new, lambda u: [scale * t for t in u]

    def to_slots(self, state: State) -> Slots:
        return [{} if v is None else {"momentum_buffer": v} for v in state]

    def from_slots(self, slots: Sequence[Mapping[str, Tensor]], params: Sequence[Tensor]) -> State:
        return [slot.get("momentum_buffer") for slot in slots]

    def reference(self, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
        )

    @property
    def invertible(self) -> bool:
        return self.momentum > 0 and not self.nesterov

    @property
    def stationary_decay(self) -> float:
        return self.weight_decay


class TorchoptRule(UpdateRule):
    """One of TorchOpt's functional optimizers, stepped at the learning rate it is given.

    The transformation is built with learning rate 1, so that its updates are
    the negative step direction, and the rule scales them by ``lr`` each step:
    a schedule acts on every step, the real ones and the virtual ones alike.

    The state is TorchOpt's, over the parameters in order, with a step count
    per parameter (``torch.optim``'s ``step``) beside it; a count TorchOpt
    keeps itself is that count, in the parameters' dtype (TorchOpt makes its
    own an integer, and its bias corrections then round to the default dtype).

    Args:
        name: the name it is registered as.
        transformation: the TorchOpt transformation, built with ``lr=1``.
        slots: TorchOpt's state field -> the ``torch.optim`` state key it is.
        reference: builds the ``torch.optim`` optimizer it equals, from (params, lr).
        stationary_decay: see :attr:`UpdateRule.stationary_decay`.
        weight_decay: the decay the transformation applies.
        decoupled: whether it is decoupled (AdamW's: theta <- theta - lr lambda theta beside the
            step) rather than added to the gradient.

    A step's own weight decay (a lesson's) is injected around the transformation:
    coupled, the gradient it is given carries (lambda' - lambda) theta more;
    decoupled, the step moves by -lr (lambda' - lambda) theta more. Momentum is not
    injected (refused).
    """

    def __init__(
        self,
        name: str,
        transformation: torchopt.base.GradientTransformation,
        slots: Mapping[str, str],
        reference: Callable[[Iterable[Tensor], float], torch.optim.Optimizer],
        stationary_decay: float | None,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        self.name = name
        self.weight_decay, self.decoupled = weight_decay, decoupled
        self.transformation = transformation
        # TorchOpt's momentum (its ``trace``, in RMSprop) takes its first call for the first
        # step whatever the state it is given, a flag in its closure rather than in its state:
        # a resumed run, or a state loaded from torch.optim, would lose its momentum for a
        # step. That call is made here, on a dummy, so that the state alone decides.
        dummy = (torch.zeros(1),)
        #: The state's shape (its parts and their fields), which does not depend on the parameters.
        self._template = transformation.init(dummy)
        transformation.update(dummy, self._template, params=dummy, inplace=False)
        self.slots = dict(slots)
        #: The ``torch.optim`` keys a parameter's state holds.
        self._kept = set(self.to_slots((self._template, [torch.zeros(())]))[0])
        self._reference = reference
        self._stationary_decay = stationary_decay

    def update(
        self,
        params: Sequence[Tensor],
        state: State,
        grads: Sequence[Tensor],
        lr: float | Tensor,
        decay: Sequence[float | Tensor | None] | None = None,
        momentum: float | Tensor | None = None,
    ) -> tuple[list[Tensor], State]:
        if momentum is not None:
            raise ValueError(
                f"a lesson's momentum is momentum SGD's (optim.name=sgd); optim.name={self.name} "
                "takes a learning-rate scale and weight decay"
            )
        inner, steps = state
        extra = [
            None if d is None else d - self.weight_decay for d in decay or [None] * len(params)
        ]
        if not self.decoupled:
            grads = [
                g if e is None else g + e * p for g, e, p in zip(grads, extra, params, strict=True)
            ]
        updates, inner = self.transformation.update(
            tuple(grads), inner, params=tuple(params), inplace=False
        )
        if self.decoupled:
            updates = [
                u if e is None else u - e * p
                for u, e, p in zip(updates, extra, params, strict=True)
            ]
        new = [
            p + lr * u if isinstance(lr, Tensor) else p.add(u, alpha=lr)
            for p, u in zip(params, updates, strict=True)
        ]
        return new, (inner, [s + 1 for s in steps])

    def to_slots(self, state: State) -> Slots:
        inner, steps = state
        slots: Slots = [{"step": s} for s in steps]
        for part in inner:
            for field in getattr(part, "_fields", ()):
                if field == "count":
                    continue  # the step, kept beside
                for slot, value in zip(slots, getattr(part, field), strict=True):
                    slot[self.slots[field]] = value
        return slots

    def from_slots(self, slots: Sequence[Mapping[str, Tensor]], params: Sequence[Tensor]) -> State:
        for slot, p in zip(slots, params, strict=True):
            if slot and not self._kept <= slot.keys():
                raise ValueError(
                    f"the optimizer state of a parameter of shape {tuple(p.shape)} has keys "
                    f"{sorted(slot)}, but optim.name={self.name} keeps {sorted(self._kept)}: it "
                    "was saved by another optimizer"
                )
        # TorchOpt's initial state only for the parameters that have taken no step yet.
        new = [p for slot, p in zip(slots, params, strict=True) if not slot]
        fresh = self.transformation.init(tuple(new)) if new else self._template
        steps = [
            torch.as_tensor(slot["step"] if slot else 0, dtype=p.dtype, device=p.device)
            for slot, p in zip(slots, params, strict=True)
        ]
        inner = []
        for part, initial_part in zip(self._template, fresh, strict=True):
            values = {}
            for field in getattr(part, "_fields", ()):
                if field == "count":
                    values[field] = list(steps)
                    continue
                initial = iter(getattr(initial_part, field))
                key = self.slots[field]
                values[field] = [slot[key] if slot else next(initial) for slot in slots]
            inner.append(part._replace(**values) if values else part)
        return tuple(inner), steps

    def reference(self, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
        return self._reference(params, lr)

    @property
    def stationary_decay(self) -> float | None:
        return self._stationary_decay


class NextStep(NamedTuple):
    """Settings for one real step, as numbers: the learning rate's scale, weight decay by
    parameter (a parameter not in it keeps the rule's), momentum (None: the rule's)."""

    lr_scale: float
    decay: dict[Tensor, float]
    momentum: float | None


def _detached(value: Any) -> Any:
    """``value`` without its graph: a tensor, or a list of them (None and numbers as they are)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, list | tuple):
        return [_detached(v) for v in value]
    return value


class RuleOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose steps are an :class:`UpdateRule`'s.

    ``lr`` lives in the parameter group, where schedules set it; the rule's
    state lives in ``self.state`` per parameter, in ``torch.optim``'s layout.
    A parameter without a gradient is left alone, its state too.
    """

    def __init__(self, params: Iterable[Tensor], rule: UpdateRule, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.rule = rule
        #: Settings for the next step alone (a lesson's :class:`~metateach.lesson.StepSettings`,
        #: resolved by :meth:`~metateach.engine.problem.BilevelProblem.step_on`); cleared by it.
        self.next_step: NextStep | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, decay, momentum = group["lr"], None, None
            if self.next_step is not None:
                lr = lr * self.next_step.lr_scale
                decay = [self.next_step.decay.get(p) for p in params]
                momentum = self.next_step.momentum
            new, state = self.rule.update(
                params,
                state_of(self, self.rule, params),
                [p.grad for p in params],
                lr,
                decay,
                momentum,
            )
            for p, q, slot in zip(params, new, self.rule.to_slots(state), strict=True):
                p.copy_(q)
                self.state[p] = slot  # fresh tensors: the rule changes none of its inputs
        self.next_step = None
        return loss


def reference_copy(
    rule: UpdateRule,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    source: torch.optim.Optimizer,
) -> torch.optim.Optimizer:
    """``rule``'s ``torch.optim`` optimizer over ``params`` at ``lr``, holding a copy of
    ``source``'s state (the layouts are the same; the parameter groups keep their own settings)."""
    optimizer = rule.reference(params, lr)
    state = copy.deepcopy(source.state_dict()["state"])
    optimizer.load_state_dict({**optimizer.state_dict(), "state": state})
    return optimizer


def state_of(optimizer: torch.optim.Optimizer, rule: UpdateRule, params: Sequence[Tensor]) -> State:
    """``rule``'s state for ``params`` as ``optimizer`` holds it (in ``torch.optim``'s layout)."""
    return rule.from_slots([optimizer.state.get(p, {}) for p in params], params)


def set_state(
    optimizer: torch.optim.Optimizer, rule: UpdateRule, params: Sequence[Tensor], state: State
) -> None:
    """Make ``state`` (``rule``'s, for ``params``) ``optimizer``'s: detached copies, which
    the optimizer may change in place while a graph still holds the originals."""
    for p, slot in zip(params, rule.to_slots(state), strict=True):
        optimizer.state[p] = {k: v.detach().clone() for k, v in slot.items()}


def rule_of(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """The update rule ``optimizer`` steps with: a :class:`RuleOptimizer`'s (under SAM too), or
    :class:`MomentumSGD` for a ``torch.optim.SGD`` (which it equals bit for bit)."""
    base = getattr(optimizer, "base", optimizer)  # SAM steps with its base
    if isinstance(base, RuleOptimizer):
        return base.rule
    if type(base) is torch.optim.SGD:
        group = base.param_groups[0]
        if group.get("dampening", 0) != 0 or group.get("maximize", False):
            raise ValueError("the student's SGD is differentiated without dampening or maximize")
        return MomentumSGD(group["momentum"], group["weight_decay"], group["nesterov"])
    raise TypeError(
        f"a teacher differentiates the student's optimizer, and {type(base).__name__} is not one "
        "it knows: build it with metateach.optim.build_optimizer(name, params, lr=...)"
    )
