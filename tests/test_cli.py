"""The command line as a newcomer meets it: the same cluster options on every cluster command, `validate`
over several files, a finished `train` answered from its summary, result tables that fit the terminal,
hints runnable as printed, and Ctrl-C in a sweep. Each runs the real CLI in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from alphadpo_ray.cli import build_parser

CLUSTER_COMMANDS = ("train", "sweep", "compare", "study")


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alphadpo_ray", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _options(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_options_are_the_same_on_every_cluster_command():
    options = {c: _options(c) & {"--address"} for c in CLUSTER_COMMANDS}
    assert all(o == {"--address"} for o in options.values()), options


def test_train_address_goes_to_the_cluster(tmp_path):
    """`train --address HOST:PORT` connects there (a one-worker run would otherwise train in-process):
    nothing answers on a free loopback port, so the cluster check says so in one line."""
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"name": "addr", "output_dir": str(tmp_path / "out"),
                                      "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray")},
                                      "tracking": {"enabled": False}}))
    port = _free_port()
    proc = _cli("train", str(config), "--address", f"127.0.0.1:{port}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"No Ray cluster answered at 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_reports_every_bad_file(tmp_path):
    """Several files: each bad one gets its own line naming it (not just the first), the good ones `ok`, exit 2."""
    files = {"bad-lr.yaml": {"training": {"learning_rate": -1}}, "good.yaml": {},
             "bad-method.yaml": {"method": {"name": "dpoo"}}}
    for name, data in files.items():
        (tmp_path / name).write_text(yaml.safe_dump({"name": name.removesuffix(".yaml"), **data}))
    proc = _cli("validate", *files, "missing.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, proc.stderr
    for name, line in zip(["bad-lr.yaml", "bad-method.yaml", "missing.yaml"], errors):
        assert name in line, errors
    assert "training.learning_rate" in errors[0] and "method.name" in errors[1]
    assert proc.stderr.splitlines() == errors and "Traceback" not in proc.stderr  # one line per bad file
    assert proc.stdout.splitlines() == ["ok  good.yaml" + proc.stdout.splitlines()[0].removeprefix("ok  good.yaml"),
                                        "3 of 4 configs invalid"]


def _run_config(tmp_path: Path, **ray) -> Path:
    """A 4-step run of one worker: with ``--address local`` it goes through Ray Train (its own Ray, a
    Train controller and worker actor), the path whose rerun and resume the test checks."""
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({
        "name": "again", "output_dir": str(tmp_path / "out"),
        "data": {"source": "builtin", "max_eval_samples": 24},
        "training": {"learning_rate": 2e-4, "per_device_train_batch_size": 8, "total_batch_size": 8, "max_steps": 4,
                     "eval_steps": 100, "logging_steps": 2, "save_steps": 4, "generation_eval_samples": 0,
                     "per_device_eval_batch_size": 24},
        "deepspeed": {"zero_stage": 0},
        "ray": {"num_workers": 1, "storage_path": str(tmp_path / "ray"), **ray},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "tests"}}))
    return config


def test_rerunning_a_finished_train_answers_from_its_summary(tmp_path, builtin_task):
    """A finished run re-run as is: one line from its stored summary, no Ray, no data preparation. Changed
    settings still refuse. With its outputs gone it resumes from the final checkpoint Ray Train wrote, here
    in the CLI's own process (no ``--address``: a one-worker run trains in process), and says so once.
    The first run trains beside another Ray instance on the machine: Ray Train's placement-group cleaner
    asks its own cluster (the job's setup hook, `worker_process`), so it neither dies with a trace ("multiple
    active Ray instances", as before the hook) nor says anything."""
    import shutil

    from ray_cluster import LocalCluster

    config = _run_config(tmp_path)
    with LocalCluster(tmp_path / "other-ray", nodes=[{"ip": "127.0.0.1", "num_cpus": 0}]):
        first = _cli("train", str(config), "--address", "local", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert "Traceback" not in output and "PlacementGroupCleaner" not in output, output[-6000:]
    assert "placement-group cleaner" not in output and "Failed to query" not in output, output[-6000:]

    again = _cli("train", str(config), "--address", "local", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [l for l in (again.stdout + again.stderr).splitlines() if l.strip()]
    summary = tmp_path / "out" / "again" / "summary.json"
    assert len(lines) == 1 and lines[0].startswith("[resume] run again already finished at step 4 of 4 "), lines
    assert f"(summary: {summary})" in lines[0] and f"{config} --address local --restart to train again" in lines[0]

    changed = _cli("train", str(config), "--address", "local", "--set", "training.learning_rate=3e-4", cwd=tmp_path)
    assert changed.returncode == 2 and "from a different config" in changed.stderr, changed.stderr[-3000:]
    assert "training.learning_rate: 0.0002 → 0.0003" in changed.stderr

    shutil.rmtree(tmp_path / "out")  # outputs gone, storage kept: the final checkpoint is resumed
    resumed = _cli("train", str(config), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [l for l in (resumed.stdout + resumed.stderr).splitlines() if "[resume] continuing from step 4 of 4" in l]
    assert len(said) == 1, resumed.stdout + resumed.stderr
    assert summary.exists()


def test_trials_table_fits_80_columns_with_unique_ids_and_distinct_headers(tmp_path):
    """COLUMNS=80: Tune-like ids sharing their prefix are shown by their unique rest, long metric names by
    distinct abbreviations named in a legend line, no value cut (no "…"), no line wider than 80."""
    script = """
from alphadpo_ray.sweep import results as res
rows = [{"trial_id": f"174de_{i:05d}", "method": "alpha-dpo", "status": "finished", "seed": 42, "alpha": 0.03 * i,
         "beta": 2.5 + i, "gamma_beta_ratio": 0.3, **{m: 0.1 * i + 0.01 for m in res.METRIC_COLUMNS}} for i in range(12)]
res.print_trials(res.mark_pareto(rows, "accuracy"), "accuracy", "quickstart: trials")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "80"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(len(l) <= 80 for l in lines) and "…" not in proc.stdout, proc.stdout
    shown = [l.split()[0] for l in lines if l.strip()[:5].isdigit()]
    assert sorted(shown) == [f"{i:05d}" for i in range(12)], proc.stdout  # every row, each id unique
    assert "trial = id after 174de_" in proc.stdout
    from alphadpo_ray.sweep.results import METRIC_COLUMNS, SHORT_HEADERS

    legend = next(i for i, l in enumerate(lines) if "acc_lr = accuracy_logratio" in l)
    text = " ".join(" ".join(lines[legend:]).split())
    for name in ("kl_sampled", "kl_sampled_se", "generation_accuracy", "generated_length"):
        assert f"{SHORT_HEADERS[name]} = {name}" in text, text
    headers = [SHORT_HEADERS.get(m, m) for m in METRIC_COLUMNS]
    assert len(set(headers)) == len(headers)


def test_init_model_help_describes_each_option_with_its_default(tmp_path):
    proc = _cli("init-model", "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split("options:", 1)[1].split())
    for option, default in (("--vocab-size", "512"), ("--hidden-size", "96"), ("--layers", "2"), ("--heads", "4"),
                            ("--sft-steps", "300"), ("--max-length", "256"), ("--max-prompt-length", "128"),
                            ("--seed", "0"), ("--family", "llama")):
        after = text.split(f"{option} {option.removeprefix('--').replace('-', '_').upper()}", 1)[1]
        described, _, _ = after.partition("(default:")
        assert described.strip() and after.split("(default: ", 1)[1].startswith(default + ")"), (option, after[:120])
