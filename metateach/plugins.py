"""Your own code, imported before a config's names are looked up.

``plugins: [my_lab.teachers, teachers/mine.py]`` in a config (or on the
command line) imports modules and files whose ``@TEACHERS.register``,
``@MODELS.register``, ... calls add entries to the registries.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from metateach.errors import ConfigError, first_line

__all__ = ["import_plugins"]


def import_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin, a module name or a ``.py`` file, once."""
    for plugin in plugins:
        try:
            if plugin.endswith(".py"):
                _import_file(Path(plugin))
            else:
                importlib.import_module(plugin)
        except ConfigError:
            raise
        except Exception as e:  # whatever the plugin's own code raises
            raise ConfigError(
                f"plugin {plugin!r} (plugins) failed: {type(e).__name__}: {first_line(e)}"
            ) from None


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"plugin file not found: {path} (plugins)")
    name = "metateach_plugins." + path.resolve().with_suffix("").as_posix().strip("/").replace(
        "/", "."
    )
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
