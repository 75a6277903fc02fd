"""The package's layering, read from its folders: a module imports only from layers below its own
(imports inside functions count too), no two modules import each other even indirectly (a circle
inside one folder included), and nothing imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import alphadpo_ray

PACKAGE = Path(alphadpo_ray.__file__).parent

# Lowest first: the root's foundation modules, the folders, then the command line. A module may import
# from lower entries, and from its own folder as long as that makes no circle.
LAYERS = [
    "compat",    # the only module that reaches private internals of Ray, Optuna, DeepSpeed, MLflow (libraries only)
    "errors",    # error types
    "console",   # a quiet driver console
    "ml",        # what a worker computes with: collectives, losses + method registry, log-probs, metrics, models, task, data
    "config",    # the typed experiment config, the sweep: section, presets, plugins
    "services",  # what a run talks to: storage, MLflow tracking, secrets
    "training",  # one training run: engines, the worker recipe, the driver's preparation and checks, launch
    "sweep",     # sweeps, compares, studies, reports
    "cli",       # the command line
    "__main__",  # python -m alphadpo_ray
]
LAYER_OF = {name: i for i, name in enumerate(LAYERS)}


def _module(path: Path) -> str:
    """Dotted name inside the package: ``ml.data.split``, ``ml.data`` for its __init__, ``cli``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _project_imports(path: Path):
    """(line, imported module, names) for every relative or absolute import of the package; `from x import y`
    with `y` a module counts as an import of that module."""
    own = _module(path)
    base = own.split(".") if path.name == "__init__.py" else own.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                up = base[: len(base) - (node.level - 1)]
                target = ".".join(up + ([node.module] if node.module else []))
            elif (node.module or "").startswith("alphadpo_ray"):
                target = node.module.removeprefix("alphadpo_ray").lstrip(".")
            else:
                continue
            submodules = [f"{target}.{n}".lstrip(".") for n in names if f"{target}.{n}".lstrip(".") in MODULES]
            for sub in submodules:
                yield node.lineno, sub, []
            if len(submodules) < len(names):
                yield node.lineno, target, [n for n in names if f"{target}.{n}".lstrip(".") not in MODULES]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("alphadpo_ray."):
                    yield node.lineno, alias.name.removeprefix("alphadpo_ray."), []


def test_every_module_has_a_layer():
    assert {_layer(m) for m in MODULES} - set(LAYER_OF) == set(), "add new root modules or folders to LAYERS"


def test_no_module_imports_from_a_layer_above_it():
    problems = []
    for module, path in sorted(MODULES.items()):
        for line, target, _ in _project_imports(path):
            if LAYER_OF[_layer(target)] > LAYER_OF[_layer(module)]:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} "
                                f"({_layer(target)}, above {_layer(module)})")
    assert problems == []


def test_no_import_circles():
    """Imports between modules form no circle — inside a folder too, where layering alone allows one."""
    graph = {m: {t for _, t, _ in _project_imports(p) if t != m} for m, p in MODULES.items()}
    circles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [module, target]) if target in trail
                               else f"{module} -> {target}")
            elif target not in state:
                visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert circles == []


def test_no_module_imports_private_names_of_another():
    problems = []
    for module, path in sorted(MODULES.items()):
        for line, target, names in _project_imports(path):
            private = [n for n in names if n.startswith("_")]
            if private and target != module:
                problems.append(f"{path.relative_to(PACKAGE)}:{line} imports {', '.join(private)} from {target}")
    assert problems == []
