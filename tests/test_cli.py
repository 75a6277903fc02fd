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
    assert proc.stdout.splitlines() == [l for l in proc.stdout.splitlines() if l.startswith("ok  good.yaml")]
    assert len(proc.stdout.splitlines()) == 1 and "Traceback" not in proc.stderr
