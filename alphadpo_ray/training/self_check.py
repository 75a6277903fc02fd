"""`alphadpo-ray self-check`: is this install's result normal?

Builds (or reuses) the built-in task's SFT reference and runs one short AlphaDPO train (the quickstart's
method and learning rate on one in-process worker, ZeRO-0, `SETTINGS["max_steps"]` steps, no MLflow), then
places each figure against the distribution measured over several seeds of the whole pipeline by
`benchmarks/readme_figures.py` (`make figures`), which writes the expectations this module reads
(`expected_figures.json` beside it). Seed k of the pipeline is SFT seed k and training seed 42 + k; a
machine of the same kind is another such draw (CPU kernels round differently and the 1,500-step SFT
amplifies it), so the check is against the seeds' spread, not one machine's exact figures.

Verdicts: ``within`` the seeds' [min, max]; ``near`` it (outside by less than the range's own width, or
`TOLERANCE` where the seeds agree closely, or inside the 99 % prediction interval of one more draw from
the seeds, mean ± t(0.995, n−1)·s·√(1 + 1/n): plausible for another draw; with fewer than 3 seeds, by less
than half the mean or 0.15); ``outside`` (likely a broken install, see `DOC`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ..config.experiment import config_from_dict
from ..errors import ConfigError
from .launch import train
from .prepare import prepare_builtin

EXPECTED = Path(__file__).with_name("expected_figures.json")
DOC = "docs/expected-results.md#is-my-result-normal-alphadpo-ray-self-check"
TRAINING_SEED = 42  # training seed of pipeline seed 0 (the quickstart's)

# The self-check's short train: experiments/quickstart.yaml's task, method and learning rate on one in-process
# worker (no Ray start), ZeRO-0, one evaluation at the end. The figures command measures exactly this.
SETTINGS = {"max_steps": 40, "generation_eval_samples": 64}

# Where every seed agrees closely, "near" still allows this much (absolute) for another draw.
TOLERANCE = {"accuracy": 0.02, "generation_accuracy": 0.03, "kl": 0.05}

FIGURES = {  # name → (where, key) in what `measure` collects
    "reference/accuracy": "held-out preference accuracy of the SFT reference",
    "reference/generation_accuracy": "greedy generation accuracy of the SFT reference",
    "short_train/accuracy": "held-out accuracy after the short train",
    "short_train/accuracy_logratio": "held-out accuracy_logratio after the short train",
    "short_train/kl": "exact KL (nats per response) after the short train",
    "short_train/generation_accuracy": "greedy generation accuracy after the short train",
}


def pipeline_overrides(seed: int) -> list[str]:
    """`--set` overrides of pipeline seed `seed`: the SFT reference's seed and the preference training's."""
    return [f"data.builtin.sft.seed={seed}", f"training.seed={TRAINING_SEED + seed}"]


def short_train_config(workdir: Path, seed: int = 0, settings: dict | None = None):
    """The self-check's short train as an ExperimentConfig, writing under `workdir`."""

    s = {**SETTINGS, **(settings or {})}
    steps = int(s["max_steps"])
    data = {
        "name": "self-check",
        "output_dir": str(workdir / "outputs"),
        "model": {"name_or_path": "builtin"},
        "data": {"source": "builtin", "max_length": 128, "max_prompt_length": 96, "max_eval_samples": 200},
        "method": {"name": "alpha-dpo", "beta": 2.5, "gamma_beta_ratio": 0.3, "alpha": 0.2},
        "training": {"learning_rate": 2.0e-4, "per_device_train_batch_size": 16, "total_batch_size": 16,
                     "max_steps": steps, "warmup_ratio": 0.1, "lr_scheduler_type": "cosine",
                     "logging_steps": steps, "eval_steps": steps, "save_steps": steps,
                     "generation_eval_samples": int(s["generation_eval_samples"]), "sampled_kl_samples": 0},
        "deepspeed": {"zero_stage": 0},
        "ray": {"num_workers": 1, "resources_per_worker": {"CPU": 1}, "storage_path": str(workdir / "ray")},
        "tracking": {"enabled": False, "experiment_name": "alphadpo-ray-self-check"},
    }
    return config_from_dict(data, "<self-check>", pipeline_overrides(seed))


def measure(seed: int = 0, settings: dict | None = None, workdir: str | os.PathLike | None = None,
            log=print) -> dict:
    """Run the self-check's pipeline for `seed`: the SFT reference (built or reused) and the short train.
    Returns {"figures": {name: value}, "seconds": {"reference": s, "short_train": s}}."""

    with tempfile.TemporaryDirectory(prefix="alphadpo-self-check-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        config = short_train_config(root, seed, settings)
        t0 = time.perf_counter()
        built = prepare_builtin(config)
        t1 = time.perf_counter()
        summary = train(config, log=log, restart=True)
        t2 = time.perf_counter()
    final = summary.get("final_eval") or {}
    ref = built.reference_metrics
    figures = {
        "reference/accuracy": ref.get("accuracy"),
        "reference/generation_accuracy": ref.get("generation_accuracy"),
        "short_train/accuracy": final.get("eval/accuracy"),
        "short_train/accuracy_logratio": final.get("eval/accuracy_logratio"),
        "short_train/kl": final.get("eval/kl"),
        "short_train/generation_accuracy": final.get("eval/generation_accuracy"),
    }
    return {"seed": seed, "settings": {**SETTINGS, **(settings or {})}, "figures": figures,
            "seconds": {"reference": round(t1 - t0, 1), "short_train": round(t2 - t1, 1)}}


def _tolerance(name: str) -> float:
    key = name.split("/", 1)[-1]
    return TOLERANCE.get(key, TOLERANCE.get(key.split("_")[-1], 0.02))


def _prediction_interval(values: list[float], level: float = 0.99) -> tuple[float, float]:
    """(mean, half-width) of the `level` prediction interval for one new draw from `values` (n ≥ 2):
    t(½ + level/2, n−1)·s·√(1 + 1/n), Student t (the figures of seeds, and of machines, are draws)."""
    import statistics

    from scipy.stats import t

    n = len(values)
    return statistics.fmean(values), float(t.ppf(0.5 + level / 2, n - 1)) * statistics.stdev(values) * (1 + 1 / n) ** 0.5


def classify(name: str, value, expected: dict) -> tuple[str, str]:
    """(verdict, line) of one figure against its expected {min, max, mean, values}."""
    if not isinstance(value, (int, float)):
        return "missing", f"{name}: not measured"
    lo, hi = expected["min"], expected["max"]
    where = f"seeds {lo:.3f}–{hi:.3f}, mean {expected.get('mean', (lo + hi) / 2):.3f}, n={len(expected.get('values', []))}"
    if lo <= value <= hi:
        return "within", f"{name} = {value:.3f}: within the seed range ({where})"
    margin = max(hi - lo, _tolerance(name))
    values = [v for v in expected.get("values") or [] if isinstance(v, (int, float))]
    if len(values) < 3:  # too few seeds to know the spread: only far off is "outside"
        margin = max(margin, 0.5 * abs(expected.get("mean", (lo + hi) / 2)), 0.15)
    near_lo, near_hi = lo - margin, hi + margin
    if len(values) >= 3:  # the seeds' spread says how far one more draw (another machine) may land
        mean, half = _prediction_interval(values)
        near_lo, near_hi = min(near_lo, mean - half), max(near_hi, mean + half)
    if near_lo <= value <= near_hi:
        return "near", f"{name} = {value:.3f}: near the seed range ({where}): plausible for another draw"
    return "outside", f"{name} = {value:.3f}: OUTSIDE ({where}): likely a broken install, see {DOC}"


def load_expected(path: str | os.PathLike | None = None) -> dict:

    file = Path(path) if path is not None else EXPECTED
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no expectations file (make figures writes {EXPECTED.name})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not JSON: {err}") from None
    block = data.get("self_check") if isinstance(data, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("figures"), dict):
        raise ConfigError(f"{file}: expected an object with self_check.figures (as make figures writes it)")
    for name, entry in block["figures"].items():
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) for k in ("min", "max"))):
            raise ConfigError(f"{file}: self_check.figures.{name}: expected an object with numeric min and max")
    return {"file": str(file), "settings": block.get("settings", {}), "figures": block["figures"],
            "provenance": data.get("provenance", {})}


def report(measured: dict, expected: dict) -> dict:
    """Each measured figure against its expectation, and the overall verdict."""
    rows = []
    for name, value in measured["figures"].items():
        if name not in expected["figures"]:
            continue
        verdict, line = classify(name, value, expected["figures"][name])
        rows.append({"figure": name, "value": value, "verdict": verdict, "line": line,
                     "expected": {k: expected["figures"][name].get(k) for k in ("min", "max", "mean", "values")}})
    comparable = {k: measured["settings"].get(k) for k in SETTINGS} == {
        k: expected["settings"].get(k, SETTINGS[k]) for k in SETTINGS}
    overall = ("outside" if any(r["verdict"] == "outside" for r in rows) else
               "near" if any(r["verdict"] in ("near", "missing") for r in rows) else "within")
    return {"overall": overall, "comparable": comparable, "settings": measured["settings"],
            "expected_settings": expected["settings"], "expected_file": expected["file"], "figures": rows,
            "seconds": measured.get("seconds"), "seed": measured.get("seed")}


def format_report(result: dict) -> str:
    lines = [f"self-check: built-in task, SFT reference + {result['settings']['max_steps']}-step AlphaDPO train "
             f"(pipeline seed {result['seed']}; seconds: {result.get('seconds')})",
             f"expected: {result['expected_file']}"]
    seeds = max((len(r.get("expected", {}).get("values") or []) for r in result["figures"]), default=0)
    if seeds < 3:
        lines.append(f"note: the expectations come from {seeds} seed(s) only: provisional; `make figures` measures more")
    if not result["comparable"]:
        lines.append(f"note: settings {result['settings']} differ from the expectations' "
                     f"{result['expected_settings']}: the comparison is not meaningful")
    lines += [f"  {r['verdict']:<8} {r['line']}" for r in result["figures"]]
    lines.append({"within": "result: every figure within the seed range: a normal install",
                  "near": "result: normal (some figures just outside the seeds' range, as another draw can be)",
                  "outside": f"result: a figure is far outside the seeds' range: likely a broken install, see {DOC}"}
                 [result["overall"]])
    return "\n".join(lines)
