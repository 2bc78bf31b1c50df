"""Where a teaching step's time goes: the methods' named phases, timed while a clock runs.

The hypergradient methods mark their parts with :func:`phase` and
:func:`timed` (the validation pass, the tangent pass, the backward through
a window, ...).
While a :class:`PhaseClock` runs, each phase's own time is summed: a
phase inside another counts for itself, not for its parent. With no clock
running a phase costs one lookup. ``tools/bench.py --phases KEY`` prints a
teaching step's phases in plain steps beside the floor's count
(:data:`metateach.lab.bench.FLOORS`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from types import TracebackType
from typing import ParamSpec, TypeVar

__all__ = ["PhaseClock", "phase", "timed"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_running: PhaseClock | None = None
_NOTHING = contextlib.nullcontext()


class PhaseClock:
    """The time spent in each phase while it runs (``with PhaseClock() as clock:``).

    ``seconds[name]`` is the phase's own time (that of phases inside it
    excluded), ``calls[name]`` how often it ran. ``sync`` runs before every
    reading of the time (``torch.cuda.synchronize`` on a GPU, whose work
    runs apart from Python); ``timer`` is the time's source.
    """

    def __init__(
        self,
        sync: Callable[[], None] | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._sync = sync
        self._timer = timer
        self._open: list[list] = []  # [name, when its own time last resumed]

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._timer()

    def enter(self, name: str) -> None:
        now = self._now()
        if self._open:  # the enclosing phase pauses
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])

    def exit(self) -> None:
        now = self._now()
        name, since = self._open.pop()
        self.seconds[name] += now - since
        self.calls[name] += 1
        if self._open:  # the enclosing phase resumes
            self._open[-1][1] = now

    def __enter__(self) -> PhaseClock:
        global _running
        if _running is not None:
            raise RuntimeError("a PhaseClock is already running")
        _running = self
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        global _running
        _running = None


class _Timed:
    __slots__ = ("clock", "name")

    def __init__(self, clock: PhaseClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.clock.enter(self.name)

    def __exit__(self, *exc: object) -> None:
        self.clock.exit()


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """A block of the phase ``name``, timed when a :class:`PhaseClock` runs."""
    clock = _running
    return _NOTHING if clock is None else _Timed(clock, name)


def timed(name: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """A function whose every call is a block of the phase ``name`` (see :func:`phase`)."""

    def decorate(function: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(function)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with phase(name):
                return function(*args, **kwargs)

        return run

    return decorate
