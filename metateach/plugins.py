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
    """Import a ``.py`` file as a module, once, whichever way it is imported.

    The module is named after the file (``my_teachers.py`` -> ``my_teachers``)
    when that name is free, so that a later ``import my_teachers`` (a script or
    a notebook beside the file) finds this module rather than running the file
    again and registering its builders a second time.
    """
    if not path.is_file():
        raise ConfigError(f"plugin file not found: {path} (plugins)")
    path = path.resolve()
    if _loaded_from(path):
        return
    name = path.stem
    if not name.isidentifier() or name in sys.modules:
        name = "metateach_plugins." + path.with_suffix("").as_posix().strip("/").replace("/", ".")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _loaded_from(path: Path) -> bool:
    """Whether a module already imported was loaded from the file ``path``."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(path.name) and Path(file).resolve() == path:
            return True
    return False
