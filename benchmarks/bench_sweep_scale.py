"""The sweep driver's cost per trial from a few to a thousand trials, and Optuna's own cost per trial.

    .venv/bin/python benchmarks/bench_sweep_scale.py                          # N = 4, 64, 256, 1024 (+ "before" to 256)
    .venv/bin/python benchmarks/bench_sweep_scale.py --sizes 4,64 --before-max 64   # quick look, ~2 min
    .venv/bin/python benchmarks/bench_sweep_scale.py --optuna-only           # Optuna samplers alone, ~3 min
    .venv/bin/python benchmarks/bench_sweep_scale.py --bare --trial-seconds 1 --concurrency 16 --sizes 1000,10000 \
        --before-max 0                                                      # issue 19: beside bare Ray Tune
    .venv/bin/python benchmarks/bench_sweep_scale.py --bare --trial-seconds 1 --concurrency 16 --nodes 16 \
        --sizes 1000 --before-max 0                                         # the same on 16 loopback nodes
    .venv/bin/python benchmarks/bench_sweep_scale.py --trial-seconds 1 --concurrency 16 --sizes 10000 \
        --before-max 0 --sampler nsga2                                      # the project alone, NSGA-II

Sweep mode: each (N, variant) is one fresh driver subprocess that starts a local Ray (``ray.init(num_cpus=C)``,
C = ``--concurrency``; with ``--nodes K``, it joins a fresh loopback cluster of K one-CPU nodes instead)
and calls `alphadpo_ray.sweep.run.run_method_sweep` — the real driver path: `_tuner` with the project's
`SafeOptunaSearch` (TPE, the pareto objective: accuracy ↑, KL ↓), Tune's ConcurrencyLimiter (4 trials at
once, actor reuse as single-worker sweeps do), the trial journal, `TrialProgress` and `SweepMLflowCallback`
to an MLflow SQLite store in a temp dir (parent run + one child run per trial). Only the trainable is
replaced (no training): a `state` trial that reports 3 steps of fake metrics (train/loss, eval/accuracy,
eval/kl, eval/accuracy_logratio, objective/score; ``step``/``total_steps`` as the recipe reports them), deterministic in the trial's hyperparameters, and one tiny checkpoint with the
last report, as a real trial's final checkpoint. Variants, interleaved per N:

* after   the sweep's default ``sweep.experiment_checkpoint_s`` (30 s) with the trial journal;
* before  ``experiment_checkpoint_s: 0`` (Tune's full experiment-state save every controller step, the old
          local-storage default), run for N <= --before-max (it grows quadratically).

* bare    (``--bare``) the anchor: bare Ray Tune on the same trials (`run_bare`: Tune's random search, the same
          concurrency and actor reuse; no Optuna, MLflow, journal or project callbacks).

``--trial-seconds S`` makes each trial last S seconds (issue 19's benchmark: 1 s, 16 at once, so the least
wall is N × S / 16, printed as ``/ideal``). Figures per run, all in the driver process and all around `run_method_sweep` only (Ray start and imports
excluded): driver CPU = user + system time of the process (`resource.getrusage(RUSAGE_SELF)`, Tune's and
Ray's driver threads included), wall time, driver peak RSS (VmHWM after a reset just before the sweep),
MLflow = time inside `SweepMLflowCallback` hooks, Optuna = time inside `OptunaSearch.suggest` and
`on_trial_complete` (ask/tell), state save = time inside Tune's `TuneController.checkpoint` (save + sync
launch). Each divided by N.

Optuna-only mode: pure Optuna (no Tune) on a 4-parameter space like AlphaDPO's (α, β, γ/β, learning rate),
two objectives, a noisy synthetic function: ms per ask + tell in windows of finished trials, for TPE as
Optuna defaults it, TPE as the sweep configures it (`_searcher`), and NSGA-II.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STEPS = 3
TRIAL_S = 0.0  # seconds each state trial lasts (spread over its steps): --trial-seconds


def state_trial(params: dict, *, base: dict, method: str, plan: dict, sweep_name: str, trainers_path: str) -> None:
    """The benchmark's trainable (a `state` trial): fake metrics for STEPS steps, a tiny final checkpoint."""
    import tempfile as _tempfile

    import ray.tune
    from ray.tune import Checkpoint

    _trial_event("start")
    alpha, beta = float(params.get("alpha", 0.1)), float(params.get("beta", 2.5))
    accuracy = 0.5 + 0.4 * math.sin(3 * alpha) * math.exp(-abs(beta - 2.5) / 5)
    kl = 0.05 + 0.1 * beta * alpha
    for step in range(1, STEPS + 1):
        time.sleep(TRIAL_S / STEPS)
        metrics = {"step": step, "total_steps": STEPS, "train/loss": 0.7 / step, "eval/accuracy": accuracy * step / STEPS,
                   "eval/kl": kl * step / STEPS, "eval/accuracy_logratio": accuracy, "objective/score": accuracy - 0.05 * kl}
        if step < STEPS:
            ray.tune.report(metrics)
            continue
        with _tempfile.TemporaryDirectory() as folder:
            Path(folder, "state.json").write_text(json.dumps({"step": step}))
            ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(folder))
    _trial_event("done")


def _trial_event(event: str) -> None:
    """``--chaos``: one line per trial start and completion in the shared BENCH_TRIAL_LOG (a trial run twice
    to completion shows as two ``done`` lines)."""
    path = os.environ.get("BENCH_TRIAL_LOG")
    if path:
        import ray.tune

        with open(path, "a") as log:
            log.write(f"{event} {ray.tune.get_context().get_trial_id()}\n")


class _Plan:
    """What `run_method_sweep` reads of a prepared run; the data fields become each trial's dataset inputs."""
    total_steps = STEPS
    reference_metrics = None
    train_uri, eval_uri = "/bench/prepared/train.parquet", "/bench/prepared/eval.parquet"
    train_pairs, eval_pairs = 1800, 200

    def to_dict(self) -> dict:
        return {}


def _status_kib(field: str) -> int | None:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else None


def _timed(cls, names: list[str], totals: dict, key: str) -> None:
    """Wrap `cls.name` so the wall time spent inside accumulates in totals[key] (class-level: nothing
    unpicklable lands on an instance Tune saves)."""
    for name in names:
        original = getattr(cls, name)

        def wrapper(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start

        setattr(cls, name, wrapper)


def _init_ray(concurrency: int) -> None:
    """A local Ray offering `concurrency` trial slots, or the loopback cluster named by RAY_ADDRESS
    (``--nodes``: one slot per node, the head has none)."""
    import ray

    env_vars = {"PYTHONPATH": str(REPO)}
    if os.environ.get("BENCH_TRIAL_LOG"):
        env_vars["BENCH_TRIAL_LOG"] = os.environ["BENCH_TRIAL_LOG"]
    env = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": False}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **env)
    else:
        ray.init(num_cpus=concurrency, include_dashboard=False, **env)


def run_one(n: int, period: float, concurrency: int, workdir: str, resume: bool = False,
            max_failures: int = 0, sampler: str = "tpe") -> dict:
    """One sweep of `n` state trials in this process (``resume``: `sweep --resume` of the one in `workdir`);
    the figures as a dict."""
    import io

    import ray
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.search.optuna import OptunaSearch

    from alphadpo_ray.services import tracking
    from alphadpo_ray.config.experiment import config_from_dict
    from alphadpo_ray.sweep import run as sweep_run
    from alphadpo_ray.sweep.nested_runs import SweepMLflowCallback

    totals = {"mlflow": 0.0, "optuna": 0.0, "save": 0.0}
    _timed(SweepMLflowCallback, ["on_trial_start", "on_trial_result", "on_trial_complete", "on_trial_error"],
           totals, "mlflow")
    _timed(OptunaSearch, ["suggest", "on_trial_complete"], totals, "optuna")
    _timed(TuneController, ["checkpoint"], totals, "save")
    sweep_run.run_trial = state_trial  # the name `_tuner` builds the trainable from (imported from sweep.trial)

    uri = f"sqlite:///{workdir}/mlflow.db"
    config = config_from_dict({
        "name": "scale", "output_dir": f"{workdir}/outputs",
        "ray": {"num_workers": 1, "storage_path": f"{workdir}/ray"},
        "tracking": {"tracking_uri": uri, "experiment_name": "scale"},
        "sweep": {"name": f"scale{n}", "num_samples": n, "max_concurrent_trials": concurrency,
                  "experiment_checkpoint_s": period, "sampler": sampler, "max_failures": max_failures},
    }, "bench_sweep_scale")
    tracking.create_sqlite_store(uri)
    _init_ray(concurrency)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # TrialProgress' lines (their cost still counts)
        result = sweep_run.run_method_sweep(config, config.sweep, config.method.name, _Plan(),
                                            name=config.sweep.name, resume=resume, uri=uri)
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    finished = sum(r["status"] == "finished" for r in result.rows)
    peak_rss_mib = _status_kib("VmHWM") / 1024
    ray.shutdown()
    # `alphadpo-ray report` over the finished sweep: the table and plots rebuilt from MLflow alone
    from alphadpo_ray.sweep.report import report

    report0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        rebuilt = report(config.sweep.name, tracking_uri=uri, output_dir=f"{workdir}/report")
    return {"n": n, "variant": "after" if period else "before", "period": period, "sampler": sampler,
            "trials": len(result.rows),
            "finished": finished,
            "cpu_user": usage.ru_utime - usage0.ru_utime, "cpu_sys": usage.ru_stime - usage0.ru_stime,
            "wall": wall, "peak_rss_mib": peak_rss_mib, **totals,
            "report_s": time.perf_counter() - report0, "report_rows": len(rebuilt["rows"])}


def bare_trial(config: dict) -> None:
    """Bare Ray Tune's trainable: the state trial's reports and final checkpoint, nothing of the project."""
    state_trial(config, base={}, method="", plan={}, sweep_name="", trainers_path="")


def run_bare(n: int, concurrency: int, workdir: str) -> dict:
    """The anchor: bare Ray Tune on the same trials — a `Tuner` with Tune's default random search over the
    same four parameters, the same concurrency and actor reuse, no Optuna, no MLflow, no journal, no
    project callbacks. The same figures as `run_one`."""
    import io

    import ray
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    _init_ray(concurrency)
    space = {"alpha": tune.loguniform(1e-3, 1.0), "beta": tune.loguniform(0.5, 10.0),
             "gamma_beta_ratio": tune.uniform(0.0, 1.0), "learning_rate": tune.loguniform(1e-5, 1e-3)}
    tuner = Tuner(tune.with_resources(bare_trial, {"CPU": 1}), param_space=space,
                  tune_config=TuneConfig(num_samples=n, max_concurrent_trials=concurrency, reuse_actors=True,
                                         metric="objective/score", mode="max"),
                  run_config=RunConfig(name=f"bare{n}", storage_path=f"{workdir}/ray", verbose=0))
    Path("/proc/self/clear_refs").write_text("5")
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        grid = tuner.fit()
    wall = time.perf_counter() - wall0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    finished = sum(r.error is None for r in grid)
    ray.shutdown()
    return {"n": n, "variant": "bare", "period": None, "trials": len(grid), "finished": finished,
            "cpu_user": usage.ru_utime - usage0.ru_utime, "cpu_sys": usage.ru_stime - usage0.ru_stime,
            "wall": wall, "peak_rss_mib": _status_kib("VmHWM") / 1024, "mlflow": 0.0, "optuna": 0.0, "save": 0.0}


def _machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    import torch

    return f"{model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, Python {platform.python_version()}"


@contextlib.contextmanager
def _cluster(nodes: int, workdir: str):
    """The driver's environment: this one (a local Ray), or with ``--nodes K`` that of a fresh loopback
    cluster (tests/ray_cluster.py: a head on 127.0.0.1 with no CPU for trials, K nodes on 127.0.0.2... with
    one CPU each, token auth), stopped by its PIDs afterwards."""
    if not nodes:
        yield None
        return
    sys.path.insert(0, str(REPO / "tests"))
    from ray_cluster import LocalCluster

    specs = [{"ip": "127.0.0.1", "num_cpus": 0}] + [{"ip": f"127.0.0.{i + 2}", "num_cpus": 1} for i in range(nodes)]
    with LocalCluster(Path(workdir) / "cluster", specs) as cluster:
        yield {**cluster.client_env(), "RAY_ADDRESS": cluster.address}


def sweep_mode(args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for n in sizes:
        if args.bare:
            runs.append((n, "bare"))
        runs.append((n, "after"))
        if n <= args.before_max:
            runs.append((n, "before"))
    ideal = f"{args.trial_seconds:g} s trials" if args.trial_seconds else "no sleep"
    print(f"settings: sizes {sizes}, variants {'bare (Ray Tune alone), ' if args.bare else ''}after "
          f"(experiment_checkpoint_s 30 + journal) and before (0, N <= {args.before_max}), {STEPS}-step state "
          f"trials ({ideal}), {args.concurrency} at once, actor reuse, {args.sampler.upper()}, pareto objective, "
          "MLflow SQLite")
    print(f"machine: {_machine()}")
    print("topology: " + (f"a loopback cluster of {args.nodes} one-CPU Ray nodes and a head with none (token auth)"
                          if args.nodes else f"one local Ray node offering {args.concurrency} trial slots"))
    print(f"load before: {os.getloadavg()}")
    results = []
    for n, variant in runs:
        with tempfile.TemporaryDirectory(prefix="bench_scale_") as workdir:
            start = time.time()
            period = {"after": 30.0, "before": 0.0}.get(variant, 30.0)
            command = [sys.executable, __file__, "--one", str(n), "--period", str(period), "--concurrency",
                       str(args.concurrency), "--workdir", workdir, "--trial-seconds", str(args.trial_seconds),
                       "--sampler", args.sampler]
            with _cluster(args.nodes, workdir) as env:
                proc = subprocess.run(command + (["--bare"] if variant == "bare" else []), env=env,
                                      capture_output=True, text=True, timeout=args.timeout)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"N={n} {variant}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
                continue
            figures = json.loads(line[len("RESULT "):])
            figures["process_s"] = time.time() - start
            results.append(figures)
            print(f"  done N={n} {variant}: {figures['wall']:.1f} s sweep, "
                  f"{figures['process_s']:.1f} s with Ray start", flush=True)
    print(f"load after: {os.getloadavg()}")
    header = (f"{'N':>6} {'variant':>7} {'trials':>6} {'done':>6} {'wall s':>8} {'/ideal':>7} {'cpu/trial s':>11} {'(sys)':>6} "
              f"{'peak RSS MiB':>12} {'mlflow/trial ms':>15} {'optuna/trial ms':>15} {'save/trial ms':>13}")
    print(header)
    for f in results:
        n = f["n"]
        ideal_s = n * args.trial_seconds / args.concurrency
        print(f"{n:>6} {f['variant']:>7} {f['trials']:>6} {f['finished']:>6} {f['wall']:>8.1f} "
              f"{(f['wall'] / ideal_s if ideal_s else float('nan')):>7.2f} "
              f"{(f['cpu_user'] + f['cpu_sys']) / n:>11.3f} {f['cpu_sys'] / n:>6.3f} "
              f"{f['peak_rss_mib']:>12.0f} {1000 * f['mlflow'] / n:>15.1f} {1000 * f['optuna'] / n:>15.1f} "
              f"{1000 * f['save'] / n:>13.1f}")
    targets(results)
    if any(f["trials"] != f["n"] or f["finished"] != f["n"] for f in results):
        print("MISS: a sweep did not finish exactly N trials: "
              + ", ".join(f"N={f['n']} {f['variant']}: {f['finished']} of {f['trials']}" for f in results))


def chaos_mode(args) -> None:
    """Issue 19's failures at scale: one sweep of N state trials on a loopback cluster of ``--nodes`` one-CPU
    nodes (--nodes >= 7) with ``sweep.max_failures`` 3. As the trials finish, the script kills 3 nodes without
    notice (at 10, 15 and 20 % of N), drains 3 for preemption (`ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION`, 10 s deadline, at 30, 35 and 40 %; each node is killed at its deadline, as
    the cloud reclaims it) and SIGKILLs the driver once (at 50 %), then runs the same sweep with resume
    (`sweep --resume`). Then checks: exactly N trials in the results, all finished; exactly N trial runs in
    MLflow, all FINISHED, each with steps 1..3 once; no trial run twice to completion (the trials' own log).
    Prints the events, the trials retried and the time lost."""
    import threading
    from collections import Counter

    sys.path.insert(0, str(REPO / "tests"))
    from ray_cluster import LocalCluster

    n, nodes = int(args.sizes.split(",")[0]), args.nodes
    if nodes < 7:
        sys.exit("--chaos needs --nodes 7 or more (3 killed, 3 drained, one left)")
    print(f"chaos: N={n} state trials ({args.trial_seconds:g} s), {args.concurrency} at once, {nodes} one-CPU nodes + "
          f"a head with none, sweep.max_failures 3; machine: {_machine()}; load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_chaos_") as workdir:
        trial_log = Path(workdir) / "trials.log"
        trial_log.touch()
        specs = [{"ip": "127.0.0.1", "num_cpus": 0}] + [{"ip": f"127.0.0.{i + 2}", "num_cpus": 1} for i in range(nodes)]
        start = time.time()
        with LocalCluster(Path(workdir) / "cluster", specs) as cluster:
            print(f"  cluster up in {time.time() - start:.0f} s", flush=True)
            env = {**cluster.client_env(), "RAY_ADDRESS": cluster.address, "BENCH_TRIAL_LOG": str(trial_log)}
            command = [sys.executable, __file__, "--one", str(n), "--max-failures", "3", "--concurrency",
                       str(args.concurrency), "--workdir", workdir, "--trial-seconds", str(args.trial_seconds)]

            def done() -> int:
                return sum(line.startswith("done ") for line in trial_log.read_text().splitlines())

            def launch(extra: list[str], name: str) -> subprocess.Popen:
                out = open(Path(workdir) / f"{name}.log", "w")
                return subprocess.Popen(command + extra, env=env, stdout=out, stderr=subprocess.STDOUT)

            events, t0 = [], time.time()

            def event(what: str) -> None:
                events.append((time.time() - t0, done(), what))
                print(f"  {events[-1][0]:7.1f} s, {events[-1][1]:>6} trials done: {what}", flush=True)

            driver = launch([], "driver")
            victims = [f"127.0.0.{i + 2}" for i in range(6)]
            plan = [(0.10, "kill", victims[0]), (0.15, "kill", victims[1]), (0.20, "kill", victims[2]),
                    (0.30, "drain", victims[3]), (0.35, "drain", victims[4]), (0.40, "drain", victims[5]),
                    (0.50, "kill driver", None)]
            reclaims = []
            for fraction, action, ip in plan:
                while done() < fraction * n and driver.poll() is None:
                    time.sleep(0.5)
                if driver.poll() is not None:
                    break
                if action == "kill":
                    cluster.kill_node(ip)
                    event(f"node {ip} killed without notice")
                elif action == "drain":
                    subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address",
                                    cluster.address, "--node-id", cluster.node_id(ip), "--reason",
                                    "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot",
                                    "--deadline-remaining-seconds", "10"],
                                   env=cluster.client_env(), check=True, capture_output=True, timeout=120)
                    event(f"node {ip} drained for preemption (10 s deadline)")
                    reclaim = threading.Timer(10, lambda ip=ip: (cluster.kill_node(ip), event(f"node {ip} reclaimed")))
                    reclaim.start()
                    reclaims.append(reclaim)
                else:
                    driver.kill()
                    driver.wait()
                    event("driver SIGKILLed")
            last = "driver"
            if driver.returncode is not None and driver.returncode < 0:  # killed: `sweep --resume` at once
                driver, last = launch(["--resume"], "resumed"), "resumed"
                event("driver started again with resume")
            driver.wait(timeout=args.timeout)
            event(f"driver exited {driver.returncode}")
            for reclaim in reclaims:
                reclaim.join()
            wall = time.time() - t0
            text = (Path(workdir) / f"{last}.log").read_text()
            line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"MISS: the sweep did not finish\n{text[-4000:]}")
                return
            figures = json.loads(line[len("RESULT "):])

        from mlflow.tracking import MlflowClient

        from alphadpo_ray.services.tracking import search_all_runs

        client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
        experiment = client.get_experiment_by_name("scale")
        runs = list(search_all_runs(client, [experiment.experiment_id], "tags.`alphadpo.kind` = 'trial'"))
        trial_ids = Counter(r.data.tags.get("alphadpo.trial_id") for r in runs)
        unfinished = [r.info.run_id for r in runs if r.info.status != "FINISHED"]
        repeated_steps = [r.info.run_id for r in runs
                          if sorted(m.step for m in client.get_metric_history(r.info.run_id, "train/loss")) != [1, 2, 3]]
        lines = [ln.split() for ln in trial_log.read_text().splitlines() if ln.strip()]
        starts = Counter(t for e, t in lines if e == "start")
        completions = Counter(t for e, t in lines if e == "done")
    ideal = n * args.trial_seconds / args.concurrency
    print(f"wall {wall:.0f} s (ideal {ideal:.0f} s without failures: {wall / ideal:.2f} x); trials started "
          f"{sum(starts.values())} for {len(starts)} trials: {sum(starts.values()) - len(starts)} retried or re-run")
    checks = [
        (f"results: {figures['trials']} trials, {figures['finished']} finished (N={n})",
         figures["trials"] == n and figures["finished"] == n),
        (f"MLflow: {len(runs)} trial runs for {len(trial_ids)} trial ids, {len(unfinished)} not FINISHED",
         len(runs) == n and len(trial_ids) == n and not unfinished),
        (f"MLflow: {len(repeated_steps)} trial runs whose train/loss steps are not 1, 2, 3 once each", not repeated_steps),
        (f"trials run twice to completion: {sum(c > 1 for c in completions.values())}",
         all(c == 1 for c in completions.values()) and len(completions) == n),
    ]
    for text, ok in checks:
        print(f"{'PASS' if ok else 'MISS'}: {text}")


def targets(results: list[dict]) -> None:
    """Issue 19's targets, one PASS/MISS line each, for every N that has the figures."""
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    after = {f["n"]: f for f in results if f["variant"] == "after"}
    bare = {f["n"]: f for f in results if f["variant"] == "bare"}
    for n, f in sorted(after.items()):
        cpu = (f["cpu_user"] + f["cpu_sys"]) / n
        if n in bare:
            ratio = f["wall"] / bare[n]["wall"]
            print(f"N={n}: project wall / bare Tune wall = {ratio:.2f} (target <= 1.2): {verdict(ratio <= 1.2)}")
        print(f"N={n}: driver CPU per trial = {cpu:.3f} s (target <= 0.03): {verdict(cpu <= 0.03)}")
        mlflow_ms = 1000 * f["mlflow"] / n
        print(f"N={n}: MLflow per trial on the driver = {mlflow_ms:.0f} ms (target <= 20): {verdict(mlflow_ms <= 20)}")
        rss = f["peak_rss_mib"] / 1024
        print(f"N={n}: driver peak RSS = {rss:.2f} GiB (target <= 1): {verdict(rss <= 1)}")
        if "report_s" in f:
            ok = f["report_s"] <= 60 and f["report_rows"] == n
            print(f"N={n}: report over the sweep = {f['report_s']:.1f} s, {f['report_rows']} trial rows from MLflow "
                  f"(target <= 60 s, all {n}): {verdict(ok)}")
    cpu = {n: (f["cpu_user"] + f["cpu_sys"]) / n for n, f in after.items()}
    if len(cpu) > 1:
        low, top = min(cpu), max(cpu)
        ratio = cpu[top] / cpu[low]
        print(f"driver CPU per trial at N={top} / at N={low} = {ratio:.2f} (flat: target <= 1.2): "
              f"{verdict(ratio <= 1.2)}")


def optuna_mode(args) -> None:
    import random

    import optuna
    from optuna.distributions import FloatDistribution

    from alphadpo_ray.sweep.run import _searcher
    from alphadpo_ray.config.sweep_settings import SweepConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"alpha": FloatDistribution(1e-3, 1.0, log=True), "beta": FloatDistribution(0.5, 10.0, log=True),
             "gamma_beta_ratio": FloatDistribution(0.0, 1.0), "learning_rate": FloatDistribution(1e-5, 1e-3, log=True)}
    configured = _searcher(SweepConfig(), [])._sampler
    samplers = {
        "tpe-default": lambda: optuna.samplers.TPESampler(seed=0),
        f"tpe-sweep ({type(configured).__name__} multivariate={configured._multivariate}, "
        f"n_startup={configured._n_startup_trials})": lambda: _searcher(SweepConfig(), [])._sampler,
        "nsga2 (population 50)": lambda: optuna.samplers.NSGAIISampler(seed=0, population_size=50),
    }
    n = args.optuna_trials
    windows = [w for w in (64, 256, 512, 1024, 2048) if w <= n]
    print(f"settings: pure Optuna {optuna.__version__}, 4 parameters, 2 objectives (max, min), {n} trials, "
          "sequential ask/tell")
    print(f"machine: {_machine()}")
    print("topology: " + (f"a loopback cluster of {args.nodes} one-CPU Ray nodes and a head with none (token auth)"
                          if args.nodes else f"one local Ray node offering {args.concurrency} trial slots"))
    print(f"load before: {os.getloadavg()}")
    table = {}
    for name, make in samplers.items():
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=make())
        rng, marks, start = random.Random(0), {}, time.perf_counter()
        for i in range(1, n + 1):
            trial = study.ask(space)
            p = trial.params
            study.tell(trial, [math.sin(3 * p["alpha"]) + 0.1 * rng.random(), 0.1 * p["beta"] * p["alpha"] + rng.random()])
            if i in windows:
                marks[i] = time.perf_counter() - start
        table[name] = marks
        print(f"  done {name}", flush=True)
    print(f"load after: {os.getloadavg()}")
    print(f"{'sampler':<60} " + " ".join(f"{f'{a}-{b} ms':>12}" for a, b in zip([0] + windows, windows)))
    for name, marks in table.items():
        cells, prev, prev_t = [], 0, 0.0
        for w in windows:
            cells.append(f"{1000 * (marks[w] - prev_t) / (w - prev):>12.1f}")
            prev, prev_t = w, marks[w]
        print(f"{name:<60} " + " ".join(cells))
    last = windows[-1]
    sweep_name = next(k for k in table if k.startswith("tpe-sweep"))
    ms = 1000 * (table[sweep_name][last] - table[sweep_name].get(windows[-2], 0.0)) / (last - (windows[-2] if len(windows) > 1 else 0))
    print(f"sweep TPE ask+tell at {last} finished trials = {ms:.1f} ms (target <= 100): {'PASS' if ms <= 100 else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="4,64,256,1024")
    parser.add_argument("--before-max", type=int, default=256, help="largest N for the 'before' variant")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per sweep subprocess")
    parser.add_argument("--optuna-only", action="store_true")
    parser.add_argument("--optuna-trials", type=int, default=1024)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--period", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--trial-seconds", type=float, default=0.0, help="how long each state trial lasts "
                        "(issue 19's anchor: 1)")
    parser.add_argument("--bare", action="store_true", help="also run bare Ray Tune on the same trials (the anchor)")
    parser.add_argument("--nodes", type=int, default=0, help="run each sweep on a fresh loopback cluster of this "
                        "many one-CPU nodes (issue 19's second topology: --nodes 16 --concurrency 16)")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-failures", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe",
                        help="the project's sweep.sampler (TPE, its default; NSGA-II for thousands of trials)")
    parser.add_argument("--chaos", action="store_true", help="the failures-at-scale run (needs --nodes >= 7; "
                        "the first of --sizes is N)")
    args = parser.parse_args()
    global TRIAL_S
    TRIAL_S = args.trial_seconds
    if args.one:
        figures = (run_bare(args.one, args.concurrency, args.workdir) if args.bare
                   else run_one(args.one, args.period, args.concurrency, args.workdir, args.resume,
                                args.max_failures, args.sampler))
        print("RESULT " + json.dumps(figures), flush=True)
    elif args.chaos:
        chaos_mode(args)
    elif args.optuna_only:
        optuna_mode(args)
    else:
        sweep_mode(args)


if __name__ == "__main__":
    main()
