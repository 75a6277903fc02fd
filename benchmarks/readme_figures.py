"""Every figure and claim the README and docs quote about results, over several seeds of the whole pipeline.

    python benchmarks/readme_figures.py [--seeds 5] [--study-seeds N] [--workdir DIR] [--json FILE]
                                        [--write-expected alphadpo_ray/training/expected_figures.json]
    make figures                      # the same, 5 seeds, and writes alphadpo_ray/training/expected_figures.json

Pipeline seed k = SFT reference seed k (`data.builtin.sft.seed`, a new reference built per seed) and
preference-training seed 42 + k (`training.seed`); seed 0 is the settings a user runs. Another machine of
the same kind is another draw of this kind (CPU kernels round differently and the 1,500-step SFT amplifies
it), so the spread over seeds is what a user's figures should fall in. Per seed, in scratch directories
under --workdir (own ALPHADPO_RAY_CACHE, MLflow store and outputs; nothing in the repository's mlruns/):

  1. `alphadpo-ray self-check --measure-only --seed k`: builds the SFT reference (timed), its held-out
     and generation accuracy, and the self-check's short train (what `alphadpo-ray self-check` compares to);
  2. `alphadpo-ray train experiments/quickstart.yaml` (KL, accuracy, generation accuracy at the end);
  3. `alphadpo-ray sweep` (the quickstart sweep: ranges over its 8 trials, lowest/highest-KL trials);
  4. `alphadpo-ray study experiments/studies/alpha-sensitivity.yaml` (its preset's SFT build timed apart);
  5. `alphadpo-ray study experiments/studies/alphadpo-vs-simpo.yaml` (the same preset: its verdict and the
     accuracy and KL differences over the study's 3 training seeds).

Phases run in that order over all seeds (so an interrupted run has the cheap figures for every seed);
results go to --json after every run, and a re-run skips what the JSON already holds. At the end it
prints, per figure, the per-seed values, min–max and mean, and each prose claim of the docs as
HOLDS (k/n) or DOES NOT HOLD (k/n).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINING_SEED = 42
PHASES = ("self_check", "train", "sweep", "study", "versus")


def machine() -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": cores, "memory_gib": mem,
            "python": platform.python_version(), "load_at_start": [round(x, 2) for x in os.getloadavg()]}


def overrides(seed: int) -> list[str]:
    return ["--set", f"data.builtin.sft.seed={seed}", "--set", f"training.seed={TRAINING_SEED + seed}"]


def cli() -> list[str]:
    return [sys.executable, "-m", "alphadpo_ray"]


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run one command (output to `log`); wall seconds, the load before and after, rc."""
    cwd.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    return {"rc": rc, "wall_s": round(wall, 1), "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "command": " ".join(cmd[2:] if cmd[:2] == cli()[:2] else cmd), "log": str(log)}


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- the phases: each returns the run record plus its figures ----------------------------------------------

def phase_self_check(seed: int, d: Path, env: dict, args) -> dict:
    out = d / "self-check.json"
    cmd = [*cli(), "self-check", "--measure-only", "--seed", str(seed), "--json", str(out), "--workdir", str(d / "sc")]
    if args.self_check_steps:
        cmd += ["--steps", str(args.self_check_steps)]
    rec = run(cmd, d, env, d / "self-check.log")
    if rec["rc"] == 0:
        m = json.loads(out.read_text())
        rec["figures"] = {**m["figures"], "time/sft_build_s": m["seconds"]["reference"],
                          "time/short_train_s": m["seconds"]["short_train"]}
        rec["settings"] = m["settings"]
    return rec


def phase_train(seed: int, d: Path, env: dict, args) -> dict:
    cmd = [*cli(), "train", str(REPO / "experiments" / "quickstart.yaml"), *overrides(seed), "--restart"]
    if args.train_steps:
        cmd += ["--set", f"training.max_steps={args.train_steps}", "--set", f"training.eval_steps={args.train_steps}"]
    rec = run(cmd, d, env, d / "train.log")
    summary = d / "outputs" / "quickstart" / "summary.json"
    if rec["rc"] == 0 and summary.exists():
        s = json.loads(summary.read_text())
        final, evals = s.get("final_eval") or {}, s.get("evals") or []
        first = evals[0] if evals else {}
        rec["figures"] = {
            "accuracy": final.get("eval/accuracy"), "accuracy_logratio": final.get("eval/accuracy_logratio"),
            "kl": final.get("eval/kl"), "generation_accuracy": final.get("eval/generation_accuracy"),
            "generation_accuracy_step0": first.get("eval/generation_accuracy"), "steps": s.get("steps"),
            "time/wall_s": rec["wall_s"],
        }
    return rec


def _trials(d: Path) -> list[dict]:
    files = sorted((d / "outputs").rglob("trials.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with open(files[-1]) as handle:
        return [r for r in csv.DictReader(handle) if r.get("status") == "finished"]


def phase_sweep(seed: int, d: Path, env: dict, args) -> dict:
    cmd = [*cli(), "sweep", *overrides(seed)]
    if args.sweep_samples:
        cmd += ["--set", f"sweep.num_samples={args.sweep_samples}"]
    if args.sweep_steps:
        cmd += ["--set", f"training.max_steps={args.sweep_steps}", "--set", f"training.eval_steps={args.sweep_steps}",
                "--set", f"training.save_steps={args.sweep_steps}"]
    rec = run(cmd, d, env, d / "sweep.log")
    rows = _trials(d)
    if rec["rc"] == 0 and rows:
        acc = [_num(r["accuracy"]) for r in rows]
        kl = [_num(r["kl"]) for r in rows]
        gen = [_num(r.get("generation_accuracy")) for r in rows]
        lo, hi = kl.index(min(kl)), kl.index(max(kl))
        rec["figures"] = {
            "trials": len(rows), "accuracy_min": min(acc), "accuracy_max": max(acc),
            "accuracy_logratio_min": min(_num(r["accuracy_logratio"]) for r in rows),
            "accuracy_logratio_max": max(_num(r["accuracy_logratio"]) for r in rows),
            "kl_min": min(kl), "kl_max": max(kl),
            "generation_accuracy_lowest_kl": gen[lo], "generation_accuracy_highest_kl": gen[hi],
            "generation_accuracy_best": max(g for g in gen if g is not None),
            "pareto_trials": sum(r.get("pareto") == "True" for r in rows),
            "time/wall_s": rec["wall_s"],
        }
    return rec


def phase_study(seed: int, d: Path, env: dict, args) -> dict:
    config = str(REPO / "experiments" / "studies" / "alpha-sensitivity.yaml")
    sft = ["--set", f"data.builtin.sft.seed={seed}"]  # the grid sets the training seeds (1, 2, 3)
    build = run([*cli(), "reference", config, *sft], d, env, d / "study-reference.log")
    rec = run([*cli(), "study", config, *sft], d, env, d / "study.log")
    rec["sft_build"] = build
    files = sorted((d / "outputs").rglob("study.json"), key=lambda p: p.stat().st_mtime)
    if rec["rc"] == 0 and files:
        s = json.loads(files[-1].read_text())
        diff = (s.get("contrast") or {}).get("differences") or {}
        groups = s.get("groups") or []
        gen = [g["intervals"].get("generation_accuracy", {}).get("mean") for g in groups]
        f = {"time/wall_s": rec["wall_s"], "time/sft_build_s": build["wall_s"]}
        for metric in ("kl", "kl_sampled", "accuracy_logratio", "generation_accuracy"):
            i = diff.get(metric) or {}
            f[f"{metric}_rise"], f[f"{metric}_rise_low"], f[f"{metric}_rise_high"] = i.get("mean"), i.get("low"), i.get("high")
        f["generation_accuracy_min"] = min((g for g in gen if g is not None), default=None)
        f["generation_accuracy_max"] = max((g for g in gen if g is not None), default=None)
        f["accuracy_logratio_alpha0"] = (groups[0]["intervals"].get("accuracy_logratio") or {}).get("mean") if groups else None
        rec["figures"] = f
    return rec


def phase_versus(seed: int, d: Path, env: dict, args) -> dict:
    """The AlphaDPO-vs-SimPO study: its verdict and the seeds' accuracy and KL differences (AlphaDPO − SimPO)."""
    config = str(REPO / "experiments" / "studies" / "alphadpo-vs-simpo.yaml")
    sft = ["--set", f"data.builtin.sft.seed={seed}"]  # the same base preset as the α study: its reference is cached
    rec = run([*cli(), "study", config, *sft], d, env, d / "versus.log")
    files = sorted((d / "outputs").rglob("study.json"), key=lambda p: p.stat().st_mtime)
    if rec["rc"] == 0 and files:
        v = json.loads(files[-1].read_text()).get("verdict") or {}
        f = {"time/wall_s": rec["wall_s"], "verdict_yes": float(v.get("answer") == "yes"),
             "verdict_no": float(v.get("answer") == "no")}
        for name, interval in (("kl_difference", v.get("kl_difference")),
                               ("accuracy_difference", v.get("accuracy_difference")),
                               ("kl_sampled_difference", (v.get("sampled") or {}).get("kl_difference"))):
            interval = interval or {}
            f[name], f[f"{name}_low"], f[f"{name}_high"] = interval.get("mean"), interval.get("low"), interval.get("high")
        rec["figures"] = f
    return rec


RUNNERS = {"self_check": phase_self_check, "train": phase_train, "sweep": phase_sweep, "study": phase_study,
           "versus": phase_versus}


# --- claims: each a function of one seed's figures (all phases), True/False/None (not measured) -------------

def _get(figs: dict, phase: str, key: str):
    return ((figs.get(phase) or {}).get("figures") or {}).get(key)


def _claim(fn):
    def wrapped(figs):
        try:
            return fn(figs)
        except TypeError:  # a figure is missing
            return None
    return wrapped


CLAIMS = [
    ("reference: held-out preference accuracy near chance (0.40–0.65)",
     _claim(lambda f: 0.40 <= _get(f, "self_check", "reference/accuracy") <= 0.65)),
    ("reference: greedy generation accuracy well below 100 % (< 0.6)",
     _claim(lambda f: _get(f, "self_check", "reference/generation_accuracy") < 0.6)),
    ("train: held-out accuracy ends ≥ 0.9",
     _claim(lambda f: _get(f, "train", "accuracy") >= 0.9)),
    ("train (claimed before, dropped): generation accuracy falls from step 0 to the end as KL grows",
     _claim(lambda f: _get(f, "train", "generation_accuracy") < _get(f, "train", "generation_accuracy_step0"))),
    ("sweep: every trial ends above the reference's held-out accuracy",
     _claim(lambda f: _get(f, "sweep", "accuracy_min") > _get(f, "self_check", "reference/accuracy"))),
    ("sweep: KL differs by at least one order of magnitude across trials (max/min ≥ 10)",
     _claim(lambda f: _get(f, "sweep", "kl_max") >= 10 * _get(f, "sweep", "kl_min"))),
    ("sweep (claimed before, dropped: false on a third machine): the lowest-KL trial has the best generation accuracy",
     _claim(lambda f: _get(f, "sweep", "generation_accuracy_lowest_kl") >= _get(f, "sweep", "generation_accuracy_best"))),
    ("sweep (claimed before, dropped): the lowest-KL trial generates better than the highest-KL trial",
     _claim(lambda f: _get(f, "sweep", "generation_accuracy_lowest_kl") > _get(f, "sweep", "generation_accuracy_highest_kl"))),
    ("sweep: the lowest-KL trial generates at least as well as the highest-KL trial",
     _claim(lambda f: _get(f, "sweep", "generation_accuracy_lowest_kl") >= _get(f, "sweep", "generation_accuracy_highest_kl"))),
    ("sweep: 3–5 of the 8 trials form the Pareto set",
     _claim(lambda f: 3 <= _get(f, "sweep", "pareto_trials") <= 5)),
    ("sweep: finishes in 2–3 min (180 s) with the SFT build",
     _claim(lambda f: _get(f, "sweep", "time/wall_s") + _get(f, "self_check", "time/sft_build_s") <= 180)),
    ("α study: exact KL's mean rises from α 0 to 0.3",
     _claim(lambda f: _get(f, "study", "kl_rise") > 0)),
    ("α study: sampled KL's mean rises from α 0 to 0.3",
     _claim(lambda f: _get(f, "study", "kl_sampled_rise") > 0)),
    ("α study (claimed before, dropped): exact KL rises from α 0 to 0.3, resolved (95 % interval above 0)",
     _claim(lambda f: _get(f, "study", "kl_rise_low") > 0)),
    ("α study (never claimed): sampled KL rises from α 0 to 0.3, resolved",
     _claim(lambda f: _get(f, "study", "kl_sampled_rise_low") > 0)),
    ("α study: accuracy_logratio does not move beyond noise (interval holds 0)",
     _claim(lambda f: _get(f, "study", "accuracy_logratio_rise_low") <= 0 <= _get(f, "study", "accuracy_logratio_rise_high"))),
    ("α study: generation accuracy does not move beyond noise (interval holds 0)",
     _claim(lambda f: _get(f, "study", "generation_accuracy_rise_low") <= 0 <= _get(f, "study", "generation_accuracy_rise_high"))),
    ("α study: finishes in ≤ 15 min with its SFT build",
     _claim(lambda f: _get(f, "study", "time/wall_s") + _get(f, "study", "time/sft_build_s") <= 900)),
    ("AlphaDPO vs SimPO: the verdict \"AlphaDPO reaches lower KL at matched accuracy\" is never yes",
     _claim(lambda f: _get(f, "versus", "verdict_yes") == 0)),
    ("AlphaDPO vs SimPO: accuracy matched (the difference interval holds 0)",
     _claim(lambda f: _get(f, "versus", "accuracy_difference_low") <= 0 <= _get(f, "versus", "accuracy_difference_high"))),
    ("AlphaDPO vs SimPO: AlphaDPO's exact KL is higher (mean difference > 0)",
     _claim(lambda f: _get(f, "versus", "kl_difference") > 0)),
    ("AlphaDPO vs SimPO: AlphaDPO's exact KL is resolved higher (verdict no)",
     _claim(lambda f: _get(f, "versus", "verdict_no") == 1)),
]


# --- summary -------------------------------------------------------------------------------------------------

def summarise(results: dict) -> dict:
    figures: dict = {}
    for phase in PHASES:
        for seed, rec in sorted((results.get(phase) or {}).items(), key=lambda kv: int(kv[0])):
            for key, value in (rec.get("figures") or {}).items():
                if isinstance(value, (int, float)):
                    figures.setdefault(f"{phase}/{key}", {"seeds": [], "values": []})
                    figures[f"{phase}/{key}"]["seeds"].append(int(seed))
                    figures[f"{phase}/{key}"]["values"].append(value)
    for entry in figures.values():
        v = entry["values"]
        entry.update(min=min(v), max=max(v), mean=statistics.fmean(v))
    seeds = sorted({int(s) for phase in PHASES for s in (results.get(phase) or {})})
    claims = []
    for text, fn in CLAIMS:
        outcomes = {s: fn({p: (results.get(p) or {}).get(str(s)) for p in PHASES}) for s in seeds}
        known = {s: o for s, o in outcomes.items() if o is not None}
        k, n = sum(known.values()), len(known)
        claims.append({"claim": text, "holds": k, "of": n, "per_seed": outcomes,
                       "verdict": "not measured" if n == 0 else f"HOLDS ({k}/{n})" if k == n else
                       f"DOES NOT HOLD ({k}/{n})"})
    return {"figures": figures, "claims": claims}


def self_check_block(figures: dict, settings: dict | None) -> dict:
    prefix = "self_check/"
    return {"settings": settings or {},
            "figures": {k[len(prefix):]: v for k, v in figures.items()
                        if k.startswith(prefix) and not k.startswith(prefix + "time/")}}


def print_table(doc: dict) -> None:
    p = doc["provenance"]
    m = p["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['platform']}; "
          f"load at start {m['load_at_start']}, now {[round(x, 2) for x in os.getloadavg()]}")
    print(f"command: {p['command']}  ({p['started']} → {p.get('updated')})")
    print(f"pipeline seed k = SFT seed k, training seed 42 + k; seeds done per phase: {p['seeds_done']}\n")
    width = max(len(k) for k in doc["figures"]) if doc["figures"] else 10
    print(f"{'figure':<{width}}  {'min–max':>17}  {'mean':>8}  per seed (seed: value)")
    for name, e in doc["figures"].items():
        fmt = (lambda x: f"{x:.0f}") if "time/" in name or name.endswith(("trials", "steps")) else (lambda x: f"{x:.3f}")
        per = ", ".join(f"{s}: {fmt(v)}" for s, v in zip(e["seeds"], e["values"]))
        print(f"{name:<{width}}  {fmt(e['min']) + '–' + fmt(e['max']):>17}  {fmt(e['mean']):>8}  {per}")
    print("\nclaims the docs make, checked per seed:")
    for c in doc["claims"]:
        print(f"  {c['verdict']:<22} {c['claim']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="pipeline seeds 0 … N-1")
    ap.add_argument("--first-seed", type=int, default=0, help="start at this seed (split seeds over runs; "
                    "--merge joins their JSON)")
    ap.add_argument("--merge", nargs="*", default=[], metavar="JSON", help="results JSON of other runs to merge in")
    ap.add_argument("--study-seeds", type=int, default=None, help="seeds for the two studies (default: --seeds)")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--workdir", default="/tmp/alphadpo-figures", help="scratch directory (cache, stores, outputs)")
    ap.add_argument("--json", default=None, help="results JSON (default: WORKDIR/readme-figures.json); "
                    "written after every run, re-runs skip what it holds")
    ap.add_argument("--write-expected", default=None, metavar="FILE",
                    help="also write the expectations alphadpo-ray self-check reads (alphadpo_ray/training/expected_figures.json)")
    ap.add_argument("--self-check-steps", type=int, default=None, help="shorter self-check train (testing this script)")
    ap.add_argument("--train-steps", type=int, default=None, help="shorter quickstart train (testing this script)")
    ap.add_argument("--sweep-samples", type=int, default=None, help="fewer sweep trials (testing this script)")
    ap.add_argument("--sweep-steps", type=int, default=None, help="shorter sweep trials (testing this script)")
    ap.add_argument("--report-only", action="store_true", help="print the table from --json, run nothing")
    args = ap.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.json) if args.json else workdir / "readme-figures.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    results = doc.get("results", {})
    for other in args.merge:
        if not Path(other).exists():
            print(f"--merge {other}: no such file yet, skipped")
            continue
        for phase, runs in (json.loads(Path(other).read_text()).get("results") or {}).items():
            for seed, rec in runs.items():
                if rec.get("figures") and not (results.get(phase) or {}).get(seed, {}).get("figures"):
                    results.setdefault(phase, {})[seed] = rec
    provenance = doc.get("provenance") or {
        "command": "python benchmarks/readme_figures.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "pipeline_seed": "k: data.builtin.sft.seed=k, training.seed=42+k (the α study's grid keeps its training "
                         "seeds 1, 2, 3)"}
    env = {**os.environ, "ALPHADPO_RAY_CACHE": str(workdir / "cache"), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    phases = [p for p in PHASES if p in args.phases.split(",")]

    def save(write: bool = True):
        provenance["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        provenance["seeds_done"] = {p: sorted(int(s) for s, r in (results.get(p) or {}).items() if r.get("figures"))
                                    for p in PHASES}
        summary = summarise(results)
        settings = next((r.get("settings") for r in (results.get("self_check") or {}).values() if r.get("settings")), None)
        new = {"provenance": provenance, **summary, "self_check": self_check_block(summary["figures"], settings),
               "results": results}
        if write:
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(new, indent=2, default=str))
            tmp.replace(out)
        return new

    if not args.report_only:
        for phase in phases:
            n = args.study_seeds if (phase in ("study", "versus") and args.study_seeds is not None) else args.seeds
            for seed in range(args.first_seed, n):
                if (results.get(phase) or {}).get(str(seed), {}).get("figures"):
                    continue
                d = workdir / f"seed-{seed}" / phase
                shutil.rmtree(d, ignore_errors=True)
                print(f"[{datetime.datetime.now():%H:%M:%S}] {phase} seed {seed} (load {os.getloadavg()[0]:.1f}) …",
                      flush=True)
                rec = RUNNERS[phase](seed, d, env, args)
                results.setdefault(phase, {})[str(seed)] = rec
                print(f"    rc {rec['rc']}, {rec['wall_s']} s; {json.dumps(rec.get('figures'))}", flush=True)
                save()
    doc = save(write=not args.report_only)  # --report-only leaves the JSON to the run that may still write it
    print_table(doc)
    if args.write_expected:
        expected = {"provenance": {**provenance, "regenerate": "make figures (benchmarks/readme_figures.py "
                                   "--seeds 5 --write-expected alphadpo_ray/training/expected_figures.json)"},
                    "self_check": doc["self_check"], "figures": doc["figures"], "claims": doc["claims"]}
        Path(args.write_expected).write_text(json.dumps(expected, indent=2, default=str) + "\n")
        print(f"\nexpectations for alphadpo-ray self-check: {args.write_expected}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
