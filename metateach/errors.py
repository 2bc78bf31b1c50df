"""Errors that are the user's to fix.

Each carries a one-line message naming the key or file and what would be
valid; ``tools/train.py`` prints it and exits with status 2, no traceback.
Anything else that escapes is a bug in metateach and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["MetateachError", "ConfigError", "DataError", "CheckpointError"]


class MetateachError(Exception):
    """A problem with the user's input: reported in one line, not a traceback."""


class ConfigError(MetateachError, ValueError):
    """A configuration file, key or value is wrong."""


class DataError(MetateachError):
    """A data set is missing, empty or inconsistent."""


class CheckpointError(MetateachError):
    """A checkpoint cannot be read or does not fit the run."""
