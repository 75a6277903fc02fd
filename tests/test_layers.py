"""The package's layering: a module imports only from layers below its own (imports inside functions
count too), and nothing imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import alphadpo_ray

PACKAGE = Path(alphadpo_ray.__file__).parent

# Lowest first. A module may import from lower layers only (and within its own subpackage).
LAYERS = [
    {"compat"},  # the only module that reaches private internals of Ray, Optuna, DeepSpeed, MLflow (libraries only)
    {"errors", "presets", "console", "plugins"},  # no project imports but compat
    {"distributed", "storage", "threads"},  # collectives; local / object storage; torch's CPU threads
    {"losses", "logprobs", "task", "models", "data"},  # the maths, models and data
    {"metrics", "sweep_settings", "plan"},  # held-out metrics, sweep schema + objectives, driver→worker contract
    {"config"},  # the typed experiment config
    {"engine", "reference_cache", "sft", "tracking"},  # DeepSpeed engines, reference pass, SFT reference, MLflow
    {"recipe", "prepare", "preflight", "init_model"},  # a worker's recipe; the driver's preparation and checks (apart)
    {"in_process"},  # a one-worker run in the driver's process (Ray Train's checkpoint manager, no Ray)
    {"launch"},  # one training run
    {"self_check"},  # `self-check`: the SFT reference and a short train against the seeds' ranges
    {"sweep"},  # sweeps and comparisons
    {"cli"},  # the command line
    {"__main__"},  # python -m alphadpo_ray
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _top(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _project_imports(path: Path):
    """(line, imported top-level module, names) for every relative or absolute import of the package."""
    tree = ast.parse(path.read_text())
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for alphadpo_ray/x.py, 1 for alphadpo_ray/sweep/x.py
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                parts = (node.module or "").split(".") if node.module else []
                if node.level - 1 < depth:  # inside the same subpackage
                    yield node.lineno, _top(path), names, (node.module or "")
                    continue
                target = parts[0] if parts else None
                if target is None:  # `from . import x` / `from .. import x`
                    for name in names:
                        yield node.lineno, name, [], ""
                else:
                    yield node.lineno, target, names, node.module
            elif (node.module or "").startswith("alphadpo_ray"):
                parts = node.module.split(".")
                yield node.lineno, parts[1] if len(parts) > 1 else names[0], names, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("alphadpo_ray."):
                    yield node.lineno, alias.name.split(".")[1], [], alias.name


def test_every_module_has_a_layer():
    modules = {_top(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE}
    assert modules - set(LAYER_OF) == set(), "add new modules to LAYERS"


def test_no_module_imports_from_a_layer_above_or_beside_it():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        own = _top(path)
        for line, target, _, _ in _project_imports(path):
            if target == own:
                continue
            if LAYER_OF[target] >= LAYER_OF[own]:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} "
                                f"(layer {LAYER_OF[target]}) from layer {LAYER_OF[own]}")
    assert problems == []


def test_no_module_imports_private_names_of_another():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _top(path)
        for line, target, names, module in _project_imports(path):
            if target == own and not module.startswith("alphadpo_ray"):
                continue
            private = [n for n in names if n.startswith("_") and n != "__future__"]
            if private:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {', '.join(private)} from {module or target}")
    assert problems == []
