#!/usr/bin/env bash
# `make upgrade-check`: install the newest versions pyproject.toml's bounds allow into a scratch venv, print
# what it got (against what alphadpo_ray/compat.py was checked on), and run the compat contract tests plus
# the resume/restore tests there. Run it before raising a bound: a failure names the library, its version
# and the internal that changed (fix it in alphadpo_ray/compat.py).
#   UPGRADE_VENV   the scratch venv (default /tmp/alphadpo-upgrade-venv; rebuilt on every run)
#   TORCH_SPEC     installed first (default torch==2.13.0, the CPU build on this machine's disk)
#   UPGRADE_TESTS  pytest arguments (default: tests/test_compat.py and the resume/restore tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${UPGRADE_VENV:-/tmp/alphadpo-upgrade-venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
RESUME="test_journal_reconciles or test_sweep_killed_and_resumed or test_direct_path_trial_killed_resumes \
or test_in_process_run_killed_resumes_under_ray_train or test_stopped_run_resumes_when_the_same_command \
or test_bad_latest_checkpoint_falls_back"
DEFAULT_TESTS=(tests/test_compat.py tests/test_sweep.py tests/test_run_identity.py tests/test_training.py
               tests/test_checkpoints.py -k "test_compat or $RESUME")

echo "== scratch venv $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
# --upgrade-strategy eager: every dependency, direct or not, at the newest version the bounds allow
"$VENV/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"

echo "== versions installed (compat checked on: $("$VENV/bin/python" -c \
  'from alphadpo_ray.compat import CHECKED_ON; print(", ".join(f"{k} {v}" for k, v in CHECKED_ON.items()))'))"
"$VENV/bin/python" - <<'PY'
import tomllib
from importlib.metadata import version
from packaging.requirements import Requirement

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    req = Requirement(spec)
    print(f"{req.name:14} {version(req.name):14} allowed {req.specifier}")
PY

echo "== tests"
if [ -n "${UPGRADE_TESTS:-}" ]; then
  read -r -a TESTS <<< "$UPGRADE_TESTS"
else
  TESTS=("${DEFAULT_TESTS[@]}")
fi
export ALPHADPO_RAY_CACHE=${ALPHADPO_RAY_CACHE:-/tmp/alphadpo-ray-test-cache}
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -rfE -p no:cacheprovider --timeout=900 "${TESTS[@]}"
