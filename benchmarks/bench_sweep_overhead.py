"""Per-trial fixed overhead of `alphadpo-ray sweep` against the floor of a bare nested Ray Train + DeepSpeed trial,
and the number of reference-model passes a sweep makes.

    .venv/bin/python benchmarks/bench_sweep_overhead.py                  # 4 trials each, 10 steps: ~6-7 min on 2 busy cores
    .venv/bin/python benchmarks/bench_sweep_overhead.py --trials 2       # quick look, ~3-4 min
    .venv/bin/python benchmarks/bench_sweep_overhead.py --trials 6 --steps 20 --keep

Everything runs in one process against one local Ray instance (``ray.init(num_cpus=4)``: 4 logical CPUs on
the 2 cores, as the test suite does, so a Train controller, 2 workers and a Tune trial fit at once):

* floor    Ray Tune runs of sequential trials (max_concurrent_trials 1, no actor reuse) whose trainable
           requests {"CPU": 0.01} and drives a nested `TorchTrainer` (--workers-multi workers, {"CPU": 1}
           each, gloo, RunConfig in a temp dir, run name ``floor_{trial_id}``, `TuneReportCallback` like the
           sweep's trials) whose train function only calls `deepspeed.init_distributed` and
           `alphadpo_ray.training.engine.build_policy_engine(config, policy, total_steps=1)` on the built-in task's
           tiny model, with the multi-worker sweep's trial config, and returns. --trials floor trials in all,
           half before and half after the multi-worker sweep (so load changes during the run hit both).
           Floor per trial = the two `Tuner.fit` wall times / --trials.
* multi    `alphadpo_ray.sweep.run.run_sweep` on the built-in task with ray.num_workers = --workers-multi
           (nested TorchTrainer trials), --trials sequential trials of --steps steps (eval at step 0 and at
           the end on 48 held-out pairs, no generation eval, reports every 5 steps, one checkpoint at the
           end), Optuna TPE, MLflow tracking to a temp SQLite store. Fresh storage: this sweep computes the
           reference cache.
* single   the same sweep with ray.num_workers = 1: the direct path (the recipe runs inside the Tune
           trial, reuse_actors), same storage, so its reference cache is a hit.

Order: floor (first half), multi, floor (second half), single.

Definitions (the numbers the targets are read from):

* sweep wall time = wall time of `run_method_sweep` alone (the Tuner: MLflow parent run, Tune start,
  trials, Tune end). Ray start, `prepare_run` (data, SFT reference, reference cache) and `_finish` (tables,
  plots, MLflow artifacts) are timed and printed separately; driver-side imports are done up front.
* a trial's own training time = its final ``time/recipe_seconds`` − ``time/setup_seconds`` as reported by
  `alphadpo_ray.training.recipe` (the training loop and its evaluations, eval at step 0 included). The recipe's
  setup (tokenizer, data read, DeepSpeed engine build) counts as overhead, because the floor trial
  builds the same engine. ``time/recipe_seconds`` is taken before the final checkpoint is written, so
  the final checkpoint write counts as overhead too. The values are taken from the results the driver
  receives (a Tune callback); ``{storage}/{sweep}/{trial_id}/result.json`` (last line) is the fallback.
* overhead per trial = (sweep wall time − Σ own training time) / trials (multi-worker), and
  (sweep wall time after the first trial's end − Σ own training time of the later trials) / (trials − 1)
  for single-worker trials after the first (the first pays the actor start and the imports).
* medians: each trial's slot = its end − the previous trial's end (the first: from the Tuner's start),
  both taken on the driver by a Tune callback; per-trial overhead = slot − own training time. The table
  shows each trial; the medians are printed next to the wall-based figures, and the ratio is given both
  ways. Other engineers' jobs share this machine's 2 cores: single timings are noisy, read medians and the
  printed load averages, and rerun when in doubt.
* reference passes: `ray.util.state.list_tasks` counts the Ray tasks named ``reference_logps`` (one per
  shard; `alphadpo_ray.training.reference_cache`) created during each sweep, and the cache files under
  ``{storage}/reference_cache/`` say how many pairs they covered. One pass over the data per sweep =
  one shard per worker, the shards together covering every training pair once; a later sweep on the same
  data and reference makes none. The held-out evaluations also run the reference (exact token KL needs
  its logits): their count (evaluations per trial × trials, each on the held-out pairs) is printed too.

Per-trial columns: ``sched`` = trial start − previous trial's end (Tune scheduling, searcher, actor
creation), ``to_recipe`` ≈ recipe start − trial start (Train controller and worker start, imports,
process group; recipe start = first result's arrival − its ``time/recipe_seconds``), ``setup`` = the
recipe's setup, ``own`` = own training time, ``after`` ≈ trial end − (recipe start + final recipe
seconds) (final checkpoint write and upload, last report, worker/controller teardown), ``slot``,
``overhead`` = slot − own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Offline and quiet, and the built-in task's SFT reference reused from the test suite's cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALPHADPO_RAY_CACHE", str(Path(tempfile.gettempdir()) / "alphadpo-ray-test-cache"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

MULTI_TARGET = 1.25  # multi-worker overhead per trial / floor per trial
SINGLE_TARGET = 2.0  # seconds of overhead per single-worker trial after the first

# --- driver-side trial timeline ---------------------------------------------------------------------

EVENTS: dict[str, dict[str, dict]] = {}  # phase -> trial_id -> {"start", "end", "results": [(t, metrics)]}
_PHASE = {"name": "floor"}


def _trial_events(trial_id: str) -> dict:
    return EVENTS.setdefault(_PHASE["name"], {}).setdefault(trial_id, {"results": []})


def _recorder_class():
    from ray.tune import Callback

    class Recorder(Callback):
        """Driver-side times of each trial's start, results and end (the sweep's own callbacks run after)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            _trial_events(trial.trial_id)["start"] = time.time()
            super().on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            keep = ("time/recipe_seconds", "time/setup_seconds", "step", "eval/step", "time_total_s",
                    "floor/engine_seconds", "floor/import_seconds", "floor/fit_seconds")
            _trial_events(trial.trial_id)["results"].append((time.time(), {k: result.get(k) for k in keep}))
            super().on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration, trials, trial, **info):
            _trial_events(trial.trial_id)["end"] = time.time()
            super().on_trial_complete(iteration, trials, trial, **info)

        def on_trial_error(self, iteration, trials, trial, **info):
            _trial_events(trial.trial_id).update(end=time.time(), error=True)
            super().on_trial_error(iteration, trials, trial, **info)

    return Recorder


def _instrument_sweep_module():
    """Wrap (in this process only) the pieces of `alphadpo_ray.sweep.run` that `run_sweep` calls by name:
    the progress callback records the timeline, the MLflow callback's driver time is summed, and
    `_prepare` / `run_method_sweep` / `_finish` are timed."""
    from alphadpo_ray.sweep import run as run_mod

    timings: dict[str, float] = {}
    Recorder = _recorder_class()

    class RecordingProgress(Recorder, run_mod.TrialProgress):
        pass

    base_mlflow = run_mod.SweepMLflowCallback

    class TimedMLflow(base_mlflow):
        pass

    for hook in ("on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"):
        original = getattr(base_mlflow, hook)

        def timed(self, *args, _original=original, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                key = f"mlflow_callback/{_PHASE['name']}"
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

        setattr(TimedMLflow, hook, timed)

    def timed_fn(label, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timings[f"{label}/{_PHASE['name']}"] = time.perf_counter() - t0
                timings[f"{label}_end/{_PHASE['name']}"] = time.time()
        return wrapper

    run_mod.TrialProgress = RecordingProgress
    run_mod.SweepMLflowCallback = TimedMLflow
    run_mod._prepare = timed_fn("prepare", run_mod._prepare)
    run_mod.run_method_sweep = timed_fn("tuner", run_mod.run_method_sweep)
    run_mod._finish = timed_fn("finish", run_mod._finish)
    return timings


# --- the floor: a bare nested Ray Train + DeepSpeed trial -------------------------------------------


def floor_worker(loop_config: dict) -> dict:
    """Ray Train worker of the floor trial: the process group DeepSpeed uses, the policy engine, return."""
    t0 = time.time()
    import deepspeed
    import torch

    from alphadpo_ray.config.experiment import ExperimentConfig
    from alphadpo_ray.training.engine import build_policy_engine, quiet_logs

    quiet_logs()
    config = ExperimentConfig.model_validate(loop_config["config"])
    torch.set_num_threads(max(1, int(config.ray.resources_per_worker.get("CPU", 1))))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    t1 = time.time()
    engine, handle = build_policy_engine(config, loop_config["policy_path"], total_steps=1)
    del engine, handle
    return {"import_seconds": t1 - t0, "engine_seconds": time.time() - t1}


def floor_trial(params: dict, *, config: dict, policy_path: str, trainers_path: str, workers: int) -> None:
    """Tune trainable of the floor: one nested TorchTrainer that only builds the engine."""
    import ray.tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    t0 = time.time()
    trainer = TorchTrainer(
        floor_worker,
        train_loop_config={"config": config, "policy_path": policy_path},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"floor_{ray.tune.get_context().get_trial_id()}", storage_path=trainers_path,
                             callbacks=[TuneReportCallback()]),
    )
    result = trainer.fit()
    out = getattr(result, "return_value", None) or {}
    ray.tune.report({"floor/fit_seconds": time.time() - t0, "floor/engine_seconds": out.get("engine_seconds"),
                     "floor/import_seconds": out.get("import_seconds")})


def run_floor(config, policy_path: str, storage: str, trials: int, workers: int, name: str) -> float:
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    trainable = tune.with_resources(
        tune.with_parameters(floor_trial, config=config.to_dict(), policy_path=policy_path,
                             trainers_path=f"{storage}/floor-trainers", workers=workers),
        {"CPU": 0.01},
    )
    tuner = Tuner(
        trainable,
        param_space={},
        tune_config=TuneConfig(num_samples=trials, max_concurrent_trials=1, reuse_actors=False,
                               trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=RunConfig(name=name, storage_path=storage, callbacks=[_recorder_class()()], verbose=0),
    )
    t0 = time.time()
    grid = tuner.fit()
    EVENTS.setdefault(name, {})["__fit__"] = {"start": t0, "end": time.time()}
    errors = [r.error for r in grid if r.error]
    if errors:
        raise RuntimeError(f"floor trial failed: {errors[0]}")
    return time.time() - t0


# --- the sweeps ----------------------------------------------------------------------------------------


def sweep_config(tmp: Path, name: str, workers: int, trials: int, steps: int, zero_stage: int):
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.config.presets import QUICKSTART_SWEEP

    base = json.loads(json.dumps(QUICKSTART_SWEEP))
    base.update(name=name, output_dir=str(tmp / "outputs"))
    base["data"] = {**base["data"], "max_eval_samples": 48}
    base["training"] = {**base["training"], "per_device_train_batch_size": 16 // workers if 16 % workers == 0 else 8,
                        "total_batch_size": 16 if 16 % workers == 0 else 8 * workers, "max_steps": steps,
                        "eval_steps": steps, "logging_steps": min(5, steps), "save_steps": steps,
                        "generation_eval_samples": 0, "per_device_eval_batch_size": 24}
    base["deepspeed"] = {"zero_stage": zero_stage}
    base["ray"] = {"num_workers": workers, "resources_per_worker": {"CPU": 1}, "storage_path": str(tmp / "storage")}
    base["tracking"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment_name": "bench-sweep-overhead"}
    base["sweep"] = {**base["sweep"], "name": f"{name}-sweep", "num_samples": trials, "max_concurrent_trials": 1}
    return config_from_dict(base, f"bench {name}")


def reference_tasks() -> int | None:
    """Ray tasks named reference_logps so far (None when the state API is unavailable)."""
    try:
        import ray
        from ray.util.state import list_tasks

        # This instance's GCS address: other Ray instances (other people's tests) may run on the machine.
        tasks = list_tasks(address=ray.get_runtime_context().gcs_address, filters=[("name", "=", "reference_logps")],
                           limit=10_000, raise_on_missing_output=False)
        return len({t.task_id for t in tasks})
    except Exception as err:  # noqa: BLE001 - no dashboard: fall back to cache files
        print(f"[note] ray.util.state.list_tasks unavailable: {err}", flush=True)
        return None


def cache_files(storage: str) -> dict[str, dict]:
    out = {}
    for meta in sorted(Path(storage, "reference_cache").glob("*.json")):
        out[meta.stem] = json.loads(meta.read_text())
    return out


def result_json(storage: str, sweep_name: str, trial_id: str) -> dict:
    path = Path(storage, sweep_name, trial_id, "result.json")
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def trial_table(phase: str, storage: str, sweep_name: str, fit_start: float) -> list[dict]:
    """Per-trial timeline rows, in order of completion."""
    trials = {k: v for k, v in EVENTS.get(phase, {}).items() if not k.startswith("__")}
    rows, prev_end = [], fit_start
    for trial_id, ev in sorted(trials.items(), key=lambda kv: kv[1].get("end", float("inf"))):
        results = [m for _, m in ev["results"]]
        timed = [(t, m) for t, m in ev["results"] if m.get("time/recipe_seconds") is not None]
        last = results[-1] if results else {}
        recipe = last.get("time/recipe_seconds")
        setup = last.get("time/setup_seconds")
        if recipe is None and not phase.startswith("floor"):  # fallback: the trial's result.json
            last = result_json(storage, sweep_name, trial_id)
            recipe, setup = last.get("time/recipe_seconds"), last.get("time/setup_seconds")
        row = {"trial": trial_id, "sched": ev.get("start", prev_end) - prev_end, "slot": ev["end"] - prev_end,
               "trial_s": ev["end"] - ev.get("start", prev_end), "error": ev.get("error", False),
               "time_total_s": last.get("time_total_s")}
        if recipe is not None:
            recipe_start = timed[0][0] - timed[0][1]["time/recipe_seconds"] if timed else None
            row.update(setup=setup, own=recipe - setup, overhead=row["slot"] - (recipe - setup))
            if recipe_start is not None:
                row.update(to_recipe=recipe_start - ev.get("start", prev_end), after=ev["end"] - recipe_start - recipe)
        if phase.startswith("floor"):
            row.update(engine=last.get("floor/engine_seconds"), imports=last.get("floor/import_seconds"),
                       fit=last.get("floor/fit_seconds"))
        rows.append(row)
        prev_end = ev["end"]
    return rows


def _f(x, width=8, digits=2) -> str:
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_trials(title: str, rows: list[dict], floor: bool = False) -> None:
    print(f"\n{title}")
    if floor:
        print(f"{'trial':<12}{'sched':>8}{'trial_s':>8}{'fit':>8}{'imports':>8}{'engine':>8}{'slot':>8}")
        for r in rows:
            print(f"{r['trial']:<12}{_f(r['sched'])}{_f(r['trial_s'])}{_f(r.get('fit'))}{_f(r.get('imports'))}"
                  f"{_f(r.get('engine'))}{_f(r['slot'])}")
        return
    print(f"{'trial':<12}{'sched':>8}{'to_recipe':>10}{'setup':>8}{'own':>8}{'after':>8}{'slot':>8}{'overhead':>9}")
    for r in rows:
        print(f"{r['trial']:<12}{_f(r['sched'])}{_f(r.get('to_recipe'), 10)}{_f(r.get('setup'))}{_f(r.get('own'))}"
              f"{_f(r.get('after'))}{_f(r['slot'])}{_f(r.get('overhead'), 9)}"
              + ("  FAILED" if r["error"] else ""))


def _median(values) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=4, help="trials per phase (floor, multi, single)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per sweep trial")
    p.add_argument("--workers-multi", type=int, default=2, help="Ray Train workers of the floor and multi trials")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage of all trials")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    p.add_argument("--keep", action="store_true", help="keep the temp directory (storage, MLflow store, outputs)")
    p.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    args = p.parse_args(argv)
    if args.trials < 2:
        p.error("--trials must be >= 2 (single-worker trials are measured after the first)")

    t_start = time.time()
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-overhead-"))
    try:
        return _run(args, tmp, t_start, load0)
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, tmp: Path, t_start: float, load0) -> int:
    t0 = time.perf_counter()
    import deepspeed  # noqa: F401 - driver-side imports, paid once by any sweep driver; done before timing
    import mlflow  # noqa: F401
    import optuna  # noqa: F401
    import pyarrow.parquet as pq
    import ray
    from ray.train.torch import TorchTrainer  # noqa: F401
    from ray.tune.integration.ray_train import TuneReportCallback  # noqa: F401
    from ray.tune.search.optuna import OptunaSearch  # noqa: F401

    from alphadpo_ray.training.launch import worker_env
    from alphadpo_ray.training.prepare import prepare_run
    from alphadpo_ray.sweep.run import run_sweep

    imports_s = time.perf_counter() - t0
    timings = _instrument_sweep_module()

    multi = sweep_config(tmp, "multi", args.workers_multi, args.trials, args.steps, args.zero_stage)
    single = sweep_config(tmp, "single", 1, args.trials, args.steps, args.zero_stage)
    storage = multi.storage_path()

    t0 = time.perf_counter()
    env = worker_env(multi)
    os.environ.update(env)  # as init_ray does (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, ...)
    ray.init(num_cpus=args.num_cpus, runtime_env={"env_vars": env}, logging_level="warning",
             log_to_driver=args.verbose)
    ray_start_s = time.perf_counter() - t0

    # The floor trial's engine: the built-in task's policy (SFT reference), without touching the reference cache.
    t0 = time.perf_counter()
    base_plan = prepare_run(multi, log=lambda *_: None, need_reference=False)
    sft_s = time.perf_counter() - t0

    # The floor's trials are split around the multi-worker sweep (half before, half after), so a change in the
    # machine's load during the run hits the floor and the sweep alike.
    floor_split = {"floor-before": args.trials // 2, "floor-after": args.trials - args.trials // 2}
    floor_walls = {}

    def floor(phase: str) -> None:
        print(f"[bench] {phase}: {floor_split[phase]} nested TorchTrainer trials ({args.workers_multi} workers), "
              "engine only", flush=True)
        _PHASE["name"] = phase
        floor_walls[phase] = run_floor(multi, base_plan.policy_path, storage, floor_split[phase], args.workers_multi,
                                       phase)

    floor("floor-before")
    counts = {"before": reference_tasks()}
    cache_before = cache_files(storage)
    results = {}
    for phase, config in (("multi", multi), ("single", single)):
        print(f"[bench] {phase}: run_sweep, {args.trials} trials x {args.steps} steps, "
              f"{config.ray.num_workers} worker(s)", flush=True)
        _PHASE["name"] = phase
        t0 = time.time()
        results[phase] = run_sweep(config, log=lambda *a: print(*a, flush=True))
        timings[f"run_sweep/{phase}"] = time.time() - t0
        time.sleep(2)  # task events reach the state API within about a second
        counts[phase] = reference_tasks()
        if phase == "multi":
            floor("floor-after")
    cache_after = cache_files(storage)

    # --- figures ---------------------------------------------------------------------------------------
    floor_rows = [r for phase in floor_split
                  for r in trial_table(phase, storage, phase, EVENTS[phase]["__fit__"]["start"])]
    floor_wall = sum(floor_walls.values())
    floor_per_trial = floor_wall / args.trials
    floor_median_slot = _median(r["slot"] for r in floor_rows)

    phase_rows, phase_walls = {}, {}
    for phase, config in (("multi", multi), ("single", single)):
        wall = timings[f"tuner/{phase}"]
        fit_end = timings[f"tuner_end/{phase}"]
        phase_walls[phase] = (fit_end - wall, wall)
        phase_rows[phase] = trial_table(phase, storage, config.sweep.name, fit_end - wall)

    m_rows, s_rows = phase_rows["multi"], phase_rows["single"]
    m_start, m_wall = phase_walls["multi"]
    s_start, s_wall = phase_walls["single"]
    if any("own" not in r for r in m_rows + s_rows):
        print("[error] some trials report no time/recipe_seconds (is the recipe's timing report in place?)")
        return 1
    m_over = (m_wall - sum(r["own"] for r in m_rows)) / len(m_rows)
    m_over_med = _median(r["overhead"] for r in m_rows)
    first_end = s_start + s_rows[0]["slot"]
    later = s_rows[1:]
    s_over = (s_start + s_wall - first_end - sum(r["own"] for r in later)) / len(later)
    s_over_med = _median(r["overhead"] for r in later)

    n_load = os.getloadavg()
    print()
    print(f"settings: built-in task, alpha-dpo, Optuna TPE (pareto), {args.trials} trials per phase, sequential "
          f"(max_concurrent_trials 1); trials: {args.steps} steps x {multi.training.total_batch_size} pairs, eval at "
          f"step 0 and {args.steps} on {multi.data.max_eval_samples} held-out pairs, reports every "
          f"{multi.training.logging_steps} steps, one checkpoint at the end, ZeRO-{args.zero_stage}, "
          f"generation eval off; MLflow tracking to a temp SQLite store")
    print(f"ray: local instance, ray.init(num_cpus={args.num_cpus}) on {os.cpu_count()} cores; "
          f"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S={os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S')}; "
          f"Ray {ray.__version__}")
    print(f"one-time costs (not in any figure below): driver imports {imports_s:.1f} s, ray.init {ray_start_s:.1f} s, "
          f"SFT reference + data (cached, prepare_run without reference) {sft_s:.1f} s")
    for phase in ("multi", "single"):
        print(f"{phase}: run_sweep {timings[f'run_sweep/{phase}']:.1f} s = prepare_run {timings[f'prepare/{phase}']:.1f} s"
              f" + run_method_sweep {timings[f'tuner/{phase}']:.1f} s + results/plots/MLflow artifacts "
              f"{timings[f'finish/{phase}']:.1f} s (+ rest); MLflow callback on the driver "
              f"{timings.get(f'mlflow_callback/{phase}', 0.0):.1f} s in total")
    print(f"load average (1 min): {load0[0]:.1f} at start, {n_load[0]:.1f} at end, on {os.cpu_count()} cores "
          "(other jobs share them: timings are noisy; medians printed next to the wall-based figures)")

    print_trials(f"floor: bare nested Ray Train + DeepSpeed trials (Tuner.fit {floor_walls['floor-before']:.1f} s for "
                 f"{floor_split['floor-before']} before the multi-worker sweep + {floor_walls['floor-after']:.1f} s for "
                 f"{floor_split['floor-after']} after it)", floor_rows, True)
    print_trials(f"multi-worker sweep ({args.workers_multi} workers, nested TorchTrainer; run_method_sweep "
                 f"{m_wall:.1f} s)", m_rows)
    print_trials(f"single-worker sweep (direct path, reuse_actors; run_method_sweep {s_wall:.1f} s)", s_rows)
    floor_tail = sum(EVENTS[ph]["__fit__"]["end"] - EVENTS[ph]["__fit__"]["start"] for ph in floor_split) - sum(
        r["slot"] for r in floor_rows)
    print(f"\n(tails after the last trial: floor {floor_tail:.2f} s in total, "
          f"multi {m_wall - sum(r['slot'] for r in m_rows):.2f} s, single {s_wall - sum(r['slot'] for r in s_rows):.2f} s)")

    # --- reference passes ----------------------------------------------------------------------------------
    new_files = {k: v for k, v in cache_after.items() if k not in cache_before}
    print()
    if counts["before"] is not None and counts.get("multi") is not None and counts.get("single") is not None:
        shards_multi = counts["multi"] - counts["before"]
        shards_single = counts["single"] - counts["multi"]
    else:
        shards_multi = shards_single = None
    rows_covered: list[int] = []
    for key in new_files:  # the cache file's rows: which training pairs the shards together covered
        rows_covered += pq.read_table(Path(storage, "reference_cache", f"{key}.parquet"), columns=["row"]).column(
            "row").to_pylist()
    train_pairs = base_plan.train_pairs
    expected_shards = min(args.workers_multi, train_pairs)  # prepare_run: one shard per worker
    if shards_multi is not None:
        first_passes = shards_multi / expected_shards
        later_passes = shards_single
    else:  # no state API: count new cache files instead
        first_passes, later_passes = len(new_files), 0
    once = len(rows_covered) == len(set(rows_covered)) == train_pairs
    files_desc = ", ".join(f"{key}: {meta.get('pairs')} pairs" for key, meta in new_files.items())
    print(f"reference cache files: {len(cache_after)} "
          f"({files_desc or 'none new'}); "
          f"training pairs {train_pairs}, covered {len(rows_covered)} rows ({len(set(rows_covered))} distinct: "
          f"{'each pair exactly once' if once else 'NOT exactly once'}); reference_logps tasks: "
          f"{shards_multi if shards_multi is not None else '?'} during the multi sweep, "
          f"{shards_single if shards_single is not None else '?'} during the single sweep")
    t = multi.training  # the recipe's schedule: step 0, every eval_steps, and the last step
    evals_per_trial = 1 + len({s for s in range(1, args.steps + 1) if s % t.eval_steps == 0 or s == args.steps})
    m_evals, s_evals = evals_per_trial * len(m_rows), evals_per_trial * len(s_rows)
    print(f"held-out reference forwards (evaluation, not cached by design: KL needs the reference's logits): "
          f"{m_evals} evaluations in the multi sweep, {s_evals} in the single sweep ({evals_per_trial} per trial), each over "
          f"{base_plan.eval_pairs} held-out pairs")
    print(f"reference passes: {first_passes:g} ({len(rows_covered)} pairs in "
          f"{shards_multi if shards_multi is not None else '?'} shards) for the first sweep, "
          f"{later_passes:g} for later sweeps (target: 1 pass over the {train_pairs} training pairs, then 0)")

    print(f"\ntotal wall time {time.time() - t_start:.0f} s")
    halves = ", ".join(f"{ph.removeprefix('floor-')} the sweep {floor_walls[ph] / max(n, 1):.2f} s"
                       for ph, n in floor_split.items() if n)
    print(f"floor per trial: {floor_per_trial:.2f} s (Tuner.fit time / {args.trials}; {halves}); "
          f"median slot {floor_median_slot:.2f} s")
    print(f"multi-worker overhead per trial (median of trials): {m_over_med:.2f} s vs floor median slot "
          f"{floor_median_slot:.2f} s -> ratio {m_over_med / floor_median_slot:.2f}")
    print(f"single-worker overhead per trial after the first (median of trials): {s_over_med:.2f} s")
    print(f"multi-worker overhead per trial: {m_over:.2f} s vs floor {floor_per_trial:.2f} s -> ratio "
          f"{m_over / floor_per_trial:.2f} (target <= {MULTI_TARGET})")
    print(f"single-worker overhead per trial after the first: {s_over:.2f} s (target <= {SINGLE_TARGET:g} s)")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
