"""Errors that are the user's to fix.

Each carries a one-line message naming the key or file and what would be
valid; ``tools/train.py`` prints it and exits with status 2, no traceback.
Anything else that escapes is a bug in metateach and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MetateachError", "ConfigError", "DataError", "CheckpointError", "NonFiniteStep",
    "RunInterrupted", "check_keys", "check_folder_name", "first_line",
]  # fmt: skip


class MetateachError(Exception):
    """A problem with the user's input: reported in one line, not a traceback."""


class ConfigError(MetateachError, ValueError):
    """A configuration file, key or value is wrong."""


class DataError(MetateachError):
    """A data set is missing, empty or inconsistent."""


class CheckpointError(MetateachError):
    """A checkpoint cannot be read or does not fit the run."""


class NonFiniteStep(MetateachError, ArithmeticError):
    """The student's gradient is not finite; its step was not taken (the run stops there)."""


class RunInterrupted(Exception):
    """A signal (SIGINT, SIGTERM) stopped the run at a step boundary, its state saved.

    Not a mistake in the input: the command exits with 128 + the signal's number.
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        # Raised in a comparison's worker, it is pickled back to the parent.
        return type(self), (self.signum, str(self))


def check_folder_name(name: str, what: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is one folder's name: nothing that leads out
    of the folder it is made in (a separator, ``..``, an absolute path)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(
            f"{what}={name!r} must be a single folder name (no '/', no '..'): "
            "runs stay inside their output folder"
        )


def check_keys(content: Any, allowed: set[str], where: str) -> None:
    """Raise :class:`ConfigError` unless ``content`` is a mapping whose keys are all ``allowed``.

    ``where`` names the file (and the entry in it) for the message.
    """
    if not isinstance(content, dict):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(sorted(allowed))}")
    if unknown := sorted(set(content) - allowed):
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(allowed))}"
        )


def first_line(problem: BaseException | str | None) -> str:
    """The first line of an exception's message (or of a text): what fits a one-line error.

    An exception with no message gives its type's name.
    """
    text = str(problem or "").strip()
    if not text and isinstance(problem, BaseException):
        return type(problem).__name__
    return text.splitlines()[0] if text else ""
