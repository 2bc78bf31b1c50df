"""How a teacher learns: the declarations a :class:`~metateach.teacher.Teacher` class sets as ``learns``.

* :class:`Hypergradient`: its parameters follow the gradient of the
  student's validation loss, computed by a method of
  :mod:`metateach.hypergrad` (which one, and its settings);
* :class:`ExampleGradient`: it has no parameters and reads its lesson off
  the validation loss's gradient with respect to each sample's weight;
* :class:`PolicyGradient`: it samples its lessons and is reinforced by a
  reward for the whole run (L2T's data filter);
* :class:`PeerLearning`: it is a second student that learns the task too,
  from the lesson the student gives it back (co-teaching, SRIT);
* :class:`WithStudent`: its parameters learn with the student's, on the
  same training loss (Barron's adaptive robust loss: its shape and scale);
* :class:`FixedRule`: it has nothing to learn (focal loss, self-paced
  learning, a random filter).

A declaration is the one place that knows, for its kind of learning, which
config section tunes it (``teacher.hypergrad``, ``teacher.policy``), what it
checks in a config, and which teaching strategy drives it: the config's
validation and the run's assembly ask it, and never ask which kind it is.
Strategies are found by name in :data:`~metateach.registry.HYPERGRADS` and
:data:`~metateach.registry.STRATEGIES`, so this module needs nothing above
the registries.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar

from metateach.errors import ConfigError
from metateach.optim.optimizers import rule_from_config
from metateach.registry import HYPERGRADS, STRATEGIES, TEACHERS, check_options

if TYPE_CHECKING:
    from metateach.config import ExperimentConfig, OptimConfig, TeacherConfig
    from metateach.engine import BilevelProblem, TeachingStrategy

__all__ = [
    "Learning",
    "Hypergradient",
    "ExampleGradient",
    "PolicyGradient",
    "PeerLearning",
    "WithStudent",
    "FixedRule",
    "configured_learning",
]


class Learning:
    """The base of the declarations: what the engine asks of any kind of learning."""

    #: Whether the teacher's parameters change in training (a teacher optimizer is built).
    learns: ClassVar[bool] = True
    #: The config section whose settings adjust the declaration (``teacher.<section>``).
    section: ClassVar[str | None] = None
    #: Whether its strategy reads the validation stream (``teacher.hypergrad.val_batch_size``).
    reads_validation: ClassVar[bool] = False
    #: Whether its strategy differentiates the student's optimizer step (SAM's is not).
    differentiates_step: ClassVar[bool] = False
    #: Whether ``teacher.refill`` may fill its batches: a filter that learns by no gradient.
    fills_batches: ClassVar[bool] = False
    #: Whether ``train.episodes`` > 1 means something to it: one teacher over several students.
    over_episodes: ClassVar[bool] = False
    #: How it learns, for messages: "teacher 'x' {how}".
    how: ClassVar[str] = ""
    #: Let gradients flow through the lesson's dependence on the student's states.
    keep_weight_grad: bool = False

    def configured(self, settings: TeacherConfig) -> Learning:
        """This declaration adjusted by the config's section for it (``settings.<section>``)."""
        _ = settings
        return self

    def check(self, cfg: ExperimentConfig) -> None:
        """Raise a :class:`ConfigError` for settings of ``cfg`` this learning cannot work with."""
        _ = cfg

    def optimizer_config(self, cfg: ExperimentConfig) -> OptimConfig:
        """The settings of the optimizer that steps the teacher's parameters."""
        return cfg.teacher.optim

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        """The strategy that drives the run: a training step, and when and how the teacher learns.

        ``seed`` seeds the strategy's own random draws (a policy's samples).
        """
        raise NotImplementedError

    def checked_method(self, method: str | None) -> tuple[str, type]:
        """The hypergradient method :func:`~metateach.hypergrad.check.check_hypergradient`
        checks for this learning when asked for ``method`` (None: its own): name and class.

        Raises:
            ValueError: it learns by no hypergradient, or not by ``method``.
        """
        raise ValueError(
            f"it {self.how}: it learns by no hypergradient, and there is none to check"
        )


@dataclass(frozen=True)
class Hypergradient(Learning):
    """Learn by the gradient of the validation loss through the student's optimizer.

    Args:
        method: a name in :data:`metateach.registry.HYPERGRADS` (``unrolled``,
            ``reversible``, ``lookahead``, ``finite_difference``, ``implicit``,
            ``learned_optimizer``).
        inner_steps: K, student steps per teacher step.
        backprop_steps: B <= K, the steps the hypergradient looks back through.
        keep_weight_grad: let gradients flow through the lesson's dependence on
            the student's parameters (the deep-interaction paper's "deeper
            interaction"); off, the teacher sees detached states.
        options: the method's own settings (e.g. ``{solver: cg}`` for ``implicit``).
    """

    section: ClassVar[str | None] = "hypergrad"
    reads_validation: ClassVar[bool] = True
    differentiates_step: ClassVar[bool] = True
    how: ClassVar[str] = "learns by hypergradient"

    method: str = "lookahead"
    inner_steps: int = 1
    backprop_steps: int = 1
    keep_weight_grad: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)

    def updated(self, **changes: Any) -> Hypergradient:
        """A copy with the settings in ``changes`` that are not None."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def configured(self, settings: TeacherConfig) -> Hypergradient:
        asked = settings.hypergrad
        # The declared options belong to the declared method; another method starts from none.
        other_method = asked.method is not None and asked.method != self.method
        return self.updated(
            method=asked.method,
            inner_steps=asked.inner_steps,
            backprop_steps=asked.backprop_steps,
            keep_weight_grad=asked.keep_weight_grad,
            options=dict(asked.options) or ({} if other_method else None),
        )

    def check(self, cfg: ExperimentConfig) -> None:
        method = HYPERGRADS.get(self.method)
        check_options(
            method,
            self.options,
            f"hypergradient method {self.method!r}",
            "teacher.hypergrad.options",
            exclude={"problem": None, "inner_steps": None, "backprop_steps": None},
        )
        if self.backprop_steps > self.inner_steps:
            raise ConfigError(
                f"teacher.hypergrad.backprop_steps (B={self.backprop_steps}) must not exceed "
                f"teacher.hypergrad.inner_steps (K={self.inner_steps})"
            )
        if reason := method.refuses_rule(rule_from_config(cfg.optim)):
            raise ConfigError(reason)

    def checked_method(self, method: str | None) -> tuple[str, type]:
        method = method or self.method
        return method, HYPERGRADS.get(method)

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        try:
            return HYPERGRADS.build(
                self.method,
                self.options,
                "teacher.hypergrad.options",
                problem=problem,
                inner_steps=self.inner_steps,
                backprop_steps=self.backprop_steps,
            )
        except ValueError as e:  # a method that cannot work with this teacher or these settings
            raise ConfigError(
                f"teacher.hypergrad.method={self.method!r} for "
                f"{type(problem.teacher).__name__}: {e}"
            ) from None


@dataclass(frozen=True)
class ExampleGradient(Learning):
    """No parameters of its own: the lesson is read off the hypergradient of each sample's weight.

    Before each student step the engine takes one virtual step on the
    eps-weighted loss sum_k eps_k l_k, evaluates the validation loss after
    it, and hands the teacher d L_val / d eps at eps = 0 in
    ``view.example_grad`` (Learning-to-Reweight, Ren et al. 2018).
    """

    reads_validation: ClassVar[bool] = True
    differentiates_step: ClassVar[bool] = True
    how: ClassVar[str] = "reads its weights off each sample's hypergradient"

    def checked_method(self, method: str | None) -> tuple[str, type]:
        if method not in (None, "example_gradient"):
            raise ValueError(
                f"it reads its lesson off each sample's hypergradient; it learns by no method such as {method!r}"
            )
        return "example_gradient", STRATEGIES.get("example_gradient")

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        return STRATEGIES.get("example_gradient")(problem)


@dataclass(frozen=True)
class PolicyGradient(Learning):
    """Learn by REINFORCE: a run's reward reinforces the teacher's random choices in it.

    At the end of a run (an episode) the teacher's ``episode_reward(history,
    context)``, which a teacher that declares this learning defines, scores it
    (``history`` holds the run's per-epoch records; ``context`` says where it
    ended, ``context.step`` of ``context.total_steps``), and the teacher steps on
    -(r - b) * S, with b a moving average of past rewards (decay
    ``baseline_decay``) and S the score of the run's exploration:

    * ``exploration="actions"`` (L2T): each lesson is sampled and carries
      its ``log_prob``; S = sum_t grad log pi(lesson_t).
    * ``exploration="parameters"`` (PGPE, Sehnke et al. 2010): each run the
      teacher acts with its parameters theta + eps, eps ~ N(0, noise_std^2),
      and S = eps / noise_std^2, the score of that draw. The randomness is
      one draw per run instead of one per decision, so the estimate's
      variance does not grow with the run's tens of thousands of decisions.
      With ``mirrored``, runs come in pairs with +eps and -eps. A checkpoint
      taken mid-episode holds the teacher at theta + eps (and theta in the
      strategy's state); the one at the end of a run holds theta.

    A config's ``teacher.policy`` section may set these fields.
    """

    section: ClassVar[str | None] = "policy"
    fills_batches: ClassVar[bool] = True
    over_episodes: ClassVar[bool] = True
    how: ClassVar[str] = "learns by REINFORCE from the lessons it samples"

    baseline_decay: float = 0.9
    exploration: str = "actions"
    noise_std: float = 0.1
    mirrored: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.exploration not in ("actions", "parameters"):
            raise ValueError(
                f"exploration must be 'actions' or 'parameters', got {self.exploration!r}"
            )
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {self.noise_std}")

    def check(self, cfg: ExperimentConfig) -> None:
        builder = TEACHERS.get(cfg.teacher.name)
        if inspect.isclass(builder) and not callable(getattr(builder, "episode_reward", None)):
            raise ConfigError(
                f"teacher {cfg.teacher.name!r} learns by policy gradient but defines no "
                "episode_reward(history, context)"
            )

    def configured(self, settings: TeacherConfig) -> PolicyGradient:
        asked = {f.name: getattr(settings.policy, f.name) for f in fields(settings.policy)}
        try:
            return replace(self, **{k: v for k, v in asked.items() if v is not None})
        except ValueError as e:
            raise ConfigError(f"teacher.policy of teacher {settings.name!r}: {e}") from None

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        return STRATEGIES.get("reinforce")(problem, self, seed=seed)


@dataclass(frozen=True)
class PeerLearning(Learning):
    """A peer student: it learns the task with the student's optimizer, from the student's lessons.

    Each step both networks see the batch; each selects for the other
    (:meth:`Teacher.forward` gives the student the peer's selection, and the
    peer learns from the student's by :meth:`PeerTeacher.select`). The peer
    takes its steps with an optimizer built from the run's ``optim`` (SAM
    included) and follows the student's learning-rate schedule.
    """

    how: ClassVar[str] = "is a peer network that selects by mask"

    def optimizer_config(self, cfg: ExperimentConfig) -> OptimConfig:
        return cfg.optim  # a peer student learns as the student does

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        return STRATEGIES.get("peer")(problem)


@dataclass(frozen=True)
class WithStudent(Learning):
    """Its parameters learn with the student's: every step, on the gradient of the same
    training loss, by an optimizer built from the run's ``optim`` that follows the student's
    learning-rate schedule (a loss whose own parameters are fitted jointly with the network,
    as Barron's adaptive robust loss fits its shape and scale).
    """

    how: ClassVar[str] = "learns with the student on the training loss"

    def optimizer_config(self, cfg: ExperimentConfig) -> OptimConfig:
        return cfg.optim

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        return STRATEGIES.get("with_student")(problem)


@dataclass(frozen=True)
class FixedRule(Learning):
    """Nothing to learn: the lesson follows a fixed rule."""

    learns: ClassVar[bool] = False
    fills_batches: ClassVar[bool] = True
    how: ClassVar[str] = "follows a fixed rule"

    def strategy(self, problem: BilevelProblem, seed: int) -> TeachingStrategy:
        return STRATEGIES.get("student_only")(problem)


def configured_learning(settings: TeacherConfig) -> Learning:
    """How the configured teacher learns: its declaration, adjusted by its config section.

    ``teacher.learn=false`` freezes any teacher into a fixed rule.
    """
    declared = getattr(TEACHERS.get(settings.name), "learns", FixedRule())
    return declared.configured(settings) if settings.learn else FixedRule()
