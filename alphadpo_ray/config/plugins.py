"""Plugins: modules or ``.py`` files a config names under ``plugins``, imported before it is validated.

A plugin extends the package when imported — typically by adding a method with
`alphadpo_ray.ml.losses.register_method`. Configs carry the list, so the driver and every Ray worker
that validates the config import the same plugins (``.py`` paths are made absolute on the driver).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

_LOADED_PLUGINS: set[str] = set()


def load_plugins(plugins) -> None:
    """Import each plugin once per process: a module name (``my_pkg.methods``) or a path to a ``.py`` file."""
    for plugin in plugins or ():
        if plugin in _LOADED_PLUGINS:
            continue
        if plugin.endswith(".py"):
            path = Path(plugin).expanduser().resolve()
            if not path.is_file():
                raise ImportError(f"plugin file not found: {plugin}")
            module_name = "alphadpo_ray_plugin_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
        else:
            importlib.import_module(plugin)
        _LOADED_PLUGINS.add(plugin)
