"""The ``sweep:`` section of an experiment config, the search spaces, and the objectives.

A base-layer module: the experiment config validates a sweep section with it and every training
worker computes the objectives with it; `alphadpo_ray.sweep` runs sweeps from it.

Search spaces use Ray Tune's space types, written in YAML as
``{type: loguniform|uniform|choice|grid|quniform, ...}``. A space is conditional on the method:
a flat ``search_space`` applies each entry to the methods that take that hyperparameter (α only
where the method has α), and a ``search_space: {method-name: {...}}`` entry overrides per method.
``learning_rate`` and ``seed`` (``training.seed``: a grid or choice of integers) belong to every method.
Each method's default space and its known-good points
(the papers' settings, evaluated first) come from its registry entry (`alphadpo_ray.ml.losses`); the
learning rate is searched around the base config's value (papers' 7B-model rates do not transfer
to other model sizes). Every range must stay inside the hyperparameter's valid range.

Objectives: by default multi-objective — maximise held-out accuracy (or ``accuracy_logratio``)
and minimise KL — so the result is a Pareto set, not one "best". Alternatively single-objective
on a named metric, or accuracy subject to a KL budget (``objective/constrained_accuracy``:
accuracy where KL ≤ budget, below any feasible trial otherwise).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..ml.losses import Hyperparameter, method_names, method_spec

SPACE_TYPES = ("loguniform", "uniform", "quniform", "choice", "grid")
_LEARNING_RATE = Hyperparameter(low=0, low_open=True)  # searched for every method
_SEED = Hyperparameter(low=0)  # training.seed: every method takes it (grid/choice of integers)


class SchedulerConfig(BaseModel):
    """Early stopping: ASHA or median stopping on a scalar metric (default accuracy − λ·KL)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    type: Literal["none", "asha", "median"] = "none"
    metric: str = "objective/score"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(20, ge=1, description="optimizer steps before a trial can be stopped")
    reduction_factor: float = Field(2.0, gt=1)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(None, description="sweep id; default: the experiment name + '-sweep'")
    methods: list[str] | None = Field(None, description="compare: the methods to run (default: every registered method)")
    num_samples: int = Field(8, ge=1, description="trials per method")
    max_concurrent_trials: int = Field(1, ge=1)
    search: Literal["optuna", "grid"] = Field("optuna", description="grid: full factorial of 'grid' entries")
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    objective: Literal["pareto", "single", "kl_budget"] = "pareto"
    accuracy_metric: Literal["accuracy", "accuracy_logratio", "generation_accuracy"] = "accuracy"
    metric: str | None = Field(None, description="single-objective: the metric to optimise")
    mode: Literal["max", "min"] = "max"
    kl_budget: float | None = Field(None, gt=0)
    kl_weight: float = Field(0.05, ge=0, description="λ in objective/score = accuracy − λ·KL")
    scheduler: SchedulerConfig = SchedulerConfig()
    search_space: dict[str, Any] = Field(default_factory=dict)
    learning_rate_range: float = Field(4.0, ge=1, description="default lr space: [lr/r, lr·r] (loguniform)")
    points_to_evaluate: bool | list[dict[str, float]] = True
    direct_single_worker: bool = Field(True, description="1-worker trials run the recipe in the Tune trial itself")
    trial_cpus: float = Field(0.01, gt=0, description="bundle of a trial that only drives a TorchTrainer")
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial")
    seeds: int = Field(3, ge=0, description="compare: after the search, re-run each method's best configuration "
                       "with this many new training seeds (≥ 2 for a confidence interval); 0 = off")
    pareto_includes_stopped: bool = Field(
        False, description="trials a scheduler stopped early may join the Pareto set (their low KL may only "
        "reflect less training)")
    experiment_checkpoint_s: float | None = Field(
        None, ge=0, description="seconds between Tune's full saves of the sweep's state (what --resume restores "
        "with the trial journal, which records every trial's start, checkpoints and end at once, so a finished "
        "trial is never re-run); default 30 s")
    tpe_startup_trials: int = Field(10, ge=1, description="tpe: random trials before TPE models the results")
    tpe_multivariate: bool = Field(True, description="tpe: model the hyperparameters jointly (α, β, γ/β and "
                                   "the learning rate interact)")
    nsga2_population: int = Field(50, ge=2, description="nsga2: trials per generation")

    @field_validator("methods")
    @classmethod
    def _known(cls, methods):
        for m in methods or []:
            if m not in method_names():
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(method_names())}")
        return methods

    @model_validator(mode="after")
    def _consistent(self):
        if self.objective == "single" and not self.metric:
            raise ValueError("objective 'single' needs sweep.metric (e.g. eval/accuracy)")
        if self.objective == "kl_budget" and self.kl_budget is None:
            raise ValueError("objective 'kl_budget' needs sweep.kl_budget")
        return self

    # --- objectives ------------------------------------------------------------------------------
    @property
    def accuracy_key(self) -> str:
        return f"eval/{self.accuracy_metric}"

    def metrics_and_modes(self) -> tuple[list[str] | str, list[str] | str]:
        if self.objective == "pareto":
            return [self.accuracy_key, "eval/kl"], ["max", "min"]
        if self.objective == "kl_budget":
            return "objective/constrained_accuracy", "max"
        return self.metric, self.mode


def objectives(eval_metrics: dict, sweep: dict | SweepConfig | None) -> dict[str, float]:
    """Scalar objectives derived from held-out metrics (added to every evaluation's report)."""
    if not sweep:
        return {}
    sweep = sweep if isinstance(sweep, SweepConfig) else SweepConfig.model_validate(sweep)
    accuracy, kl = eval_metrics.get(sweep.accuracy_key), eval_metrics.get("eval/kl")
    if accuracy is None or kl is None or not (math.isfinite(accuracy) and math.isfinite(kl)):
        return {}
    out = {"objective/score": accuracy - sweep.kl_weight * kl}
    if sweep.kl_budget is not None:
        over = max(0.0, kl - sweep.kl_budget)
        out["objective/constrained_accuracy"] = accuracy if over == 0 else -1.0 - over
    return out


# --- search spaces ---------------------------------------------------------------------------------


def _check_entry(name: str, spec: Any, hyperparameter=None) -> dict:
    """A valid space spec for `name`, inside `hyperparameter`'s valid range when one is given."""
    if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
        raise ValueError(f"sweep.search_space.{name}: expected {{type: {'|'.join(SPACE_TYPES)}, ...}}, got {spec!r}")
    kind = spec["type"]
    if kind in ("choice", "grid"):
        if not isinstance(spec.get("values"), list) or not spec["values"]:
            raise ValueError(f"sweep.search_space.{name}: '{kind}' needs a non-empty list 'values'")
        values = spec["values"]
    else:
        low, high = spec.get("low"), spec.get("high")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise ValueError(f"sweep.search_space.{name}: '{kind}' needs numbers low < high, got {low}, {high}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"sweep.search_space.{name}: loguniform needs low > 0, got {low}")
        values = [low, high]
    for value in values if hyperparameter is not None else []:
        problem = hyperparameter.problem(value)
        if problem:
            raise ValueError(f"sweep.search_space.{name}: the space reaches {value!r}, outside the valid range "
                             f"({problem.split(', got')[0]})")
    return spec


def method_space(sweep: SweepConfig, method: str, base_learning_rate: float) -> dict[str, dict]:
    """The validated space spec of one method: its registry defaults, then flat entries it takes, then
    its own section."""
    spec = method_spec(method)
    ranges = {**spec.hyperparameters, "learning_rate": _LEARNING_RATE, "seed": _SEED}
    takes = set(ranges)
    r = sweep.learning_rate_range
    space: dict[str, dict] = {
        "learning_rate": {"type": "loguniform", "low": base_learning_rate / r, "high": base_learning_rate * r}
    } if r > 1 else {}
    space.update(spec.default_space())
    names = method_names()
    flat = {k: v for k, v in sweep.search_space.items() if k not in names}
    all_taken = set().union(*(method_spec(m).hyperparameters for m in names)) | {"learning_rate", "seed"}
    for name, entry in flat.items():
        if name not in all_taken:
            raise ValueError(f"sweep.search_space.{name}: no method takes this hyperparameter")
        if name in takes:
            space[name] = _check_entry(name, entry, ranges[name])
    for name, entry in (sweep.search_space.get(method) or {}).items():
        if name not in takes:
            raise ValueError(f"sweep.search_space.{method}.{name}: method {method!r} does not take it; "
                             f"it takes {', '.join(sorted(takes))}")
        space[name] = _check_entry(f"{method}.{name}", entry, ranges[name])
    if "seed" in space:
        _check_seed(space["seed"])
    return space


def _check_seed(spec: dict) -> None:
    """A seed space lists integer training seeds (a seed is no continuous hyperparameter)."""
    values = spec.get("values") if spec["type"] in ("grid", "choice") else None
    if values is None or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"sweep.search_space.seed: expected {{type: grid|choice, values: [integers]}}, got {spec!r}")


def starting_points(sweep: SweepConfig, method: str, space: dict[str, dict], defaults: dict[str, float]) -> list[dict]:
    """Points evaluated first: the papers' settings, or the user's list, moved into the space (choices
    snap to the nearest value, ranges clip). Hyperparameters a point leaves out take `defaults` (the
    base config's method hyperparameters and learning rate)."""
    if sweep.points_to_evaluate is False:
        return []
    raw = method_spec(method).paper_points if sweep.points_to_evaluate is True else sweep.points_to_evaluate
    points = []
    for point in raw:
        full = {}
        for name, spec in space.items():
            value = point.get(name, defaults.get(name))
            if value is None:
                continue
            if spec["type"] in ("choice", "grid"):
                value = min(spec["values"], key=lambda v: abs(float(v) - float(value)))
            else:
                value = min(max(value, spec["low"]), spec["high"])
            full[name] = value
        if set(full) == set(space):
            points.append(full)
    return points
