"""Registries let a YAML file name a data set, a noise model, a student, an
optimizer, a schedule or a teacher.

Each registry maps a name to a builder (a function or a class). Builders
register themselves where they are defined::

    @MODELS.register("resnet32")
    def resnet32(num_classes: int, in_shape: tuple[int, int, int]) -> Student: ...

and the configuration looks them up by name. An unknown name is a
:class:`~metateach.errors.ConfigError` that names the config key and lists
what is available.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from metateach.errors import ConfigError

__all__ = [
    "Registry",
    "DATASETS",
    "NOISES",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TEACHERS",
    "HYPERGRADS",
    "STRATEGIES",
]

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A name -> builder table for one kind of thing.

    Args:
        kind: what is registered, for messages ("model").
        key: the config key that names an entry ("model.name").
    """

    def __init__(self, kind: str, key: str) -> None:
        self.kind = kind
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register the builder under ``name`` (default: its ``__name__``).

        Registering the same builder again does nothing; another builder under a
        taken name is an error.
        """

        def add(builder: T) -> T:
            entry = name or builder.__name__
            if self._entries.get(entry, builder) is not builder:
                raise ValueError(f"{self.kind} {entry!r} is registered twice")
            self._entries[entry] = builder
            return builder

        return add

    def get(self, name: str) -> T:
        """The builder registered as ``name``; a ConfigError naming the choices otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r} ({self.key}); available: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, options: Mapping[str, Any], options_key: str, **context: Any) -> Any:
        """Call the builder ``name`` with user ``options`` and whatever of ``context`` it takes.

        ``options`` come from YAML (``model.kwargs``); a name the builder does
        not take is reported against ``options_key`` with the valid names.
        ``context`` offers what the library knows (``num_classes``, the
        student, ...); a builder receives the entries its signature names.
        """
        builder = self.get(name)
        check_options(builder, options, f"{self.kind} {name!r}", options_key, exclude=context)
        return builder(
            **{k: v for k, v in context.items() if k in _named_parameters(builder)}, **options
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def check_options(
    builder: Callable[..., Any],
    options: Mapping[str, Any],
    what: str,
    key: str,
    exclude: Mapping[str, Any] = {},  # noqa: B006 - read only
) -> None:
    """Reject option names that ``builder`` does not name as parameters, and values that do
    not fit its annotations (``int``, ``float``, ``bool``, ``str``, lists, unions, literals)."""
    valid = [n for n in _named_parameters(builder) if n not in exclude]
    for option in options:
        if option not in valid:
            choices = ", ".join(valid) if valid else "none"
            raise ConfigError(f"unknown option {option!r} for {what} ({key}); valid: {choices}")
    hints = _type_hints(builder)
    for option, value in options.items():
        hint = hints.get(option)
        if hint is not None and not _fits(value, hint):
            raise ConfigError(
                f"{key}.{option}={value!r} does not fit {what}: it takes {_describe(hint)}"
            )


def _type_hints(builder: Callable[..., Any]) -> dict[str, Any]:
    """The builder's parameter annotations, resolved; none where they cannot be."""
    target = builder.__init__ if inspect.isclass(builder) else builder  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation naming what only type checkers import
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits an annotation; what it cannot judge, it lets through."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_fits, value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    """An annotation as a reader of a config would say it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint is type(None):
        return "null"
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_describe(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _named_parameters(builder: Callable[..., Any]) -> list[str]:
    """The keyword-passable parameters a builder names (``**kwargs`` catch-alls do not count)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in inspect.signature(builder).parameters.items() if p.kind in kinds]


DATASETS: Registry[Callable[..., Any]] = Registry("dataset", "data.name")
NOISES: Registry[Callable[..., Any]] = Registry("noise", "noise.type")
MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name")
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer", "optim.name")
SCHEDULES: Registry[Callable[..., Any]] = Registry("schedule", "schedule.name")
TEACHERS: Registry[Callable[..., Any]] = Registry("teacher", "teacher.name")
HYPERGRADS: Registry[Callable[..., Any]] = Registry(
    "hypergradient method", "teacher.hypergrad.method"
)
#: The strategies that drive the other kinds of learning (:mod:`metateach.learning`), by name.
STRATEGIES: Registry[Callable[..., Any]] = Registry("teaching strategy", "teacher.name")
