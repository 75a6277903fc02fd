"""Runs held at one training step (the scenario tests' shared plugin, `tests/plugins/held_method.py`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

PLUGIN = Path(__file__).parent / "plugins" / "held_method.py"
_NAMES: dict[str, Path] = {}  # name -> folder, for this pytest process


def held_plugin(folder: Path, name: str, *, step: int = 6, action: str = "sleep", loss: str = "simpo",
                trial: int | None = None) -> Path:
    """Write the held method into `folder` (registered as `name`) and arm it: the `hold` file for
    ``sleep``/``fail``; `trial` K: hold at `step` of the K-th sweep trial to train (steps counted per trial).
    Returns the plugin's path for the config's ``plugins``."""
    assert action in ("sleep", "wait", "fail") and loss in ("simpo", "dpo")
    # the method registry is process-wide: a name must be unique across the suite (give each test its own)
    assert _NAMES.setdefault(name, folder) == folder, f"held method {name!r} is already used by {_NAMES[name]}"
    folder.mkdir(parents=True, exist_ok=True)
    plugin = folder / "held_method.py"
    shutil.copyfile(PLUGIN, plugin)
    settings = {"name": name, "step": step, "action": action, "loss": loss, **({"trial": trial} if trial else {})}
    plugin.with_suffix(".json").write_text(json.dumps(settings))
    if action != "wait":
        (folder / "hold").touch()
    return plugin
