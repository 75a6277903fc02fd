# Two commands on a fresh machine: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of PyTorch that lies on this machine's disk; on a GPU machine see README "Installing by hand, and on GPUs".
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test test-quick upgrade-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/alphadpo-ray sweep

# -rfE: the failures and errors at the end; --durations: the slowest tests. A hung test fails with its
# name after PER_TEST_TIMEOUT (pytest-timeout); the whole run gets SIGINT at SUITE_LIMIT, still under CI's
# 90 minutes, so pytest prints the same summary for whatever ran before it stops.
PER_TEST_TIMEOUT ?= 600
SUITE_LIMIT ?= 80m
PYTEST_ARGS ?=

test: setup
	timeout --signal=INT --kill-after=120 $(SUITE_LIMIT) \
	  $(BIN)/python -m pytest -q -rfE --durations=25 --timeout=$(PER_TEST_TIMEOUT) $(PYTEST_ARGS) tests

# The inner loop: no Ray, cluster, server or training run (tests/conftest.py --quick).
test-quick: setup
	$(BIN)/python -m pytest -q -rfE --durations=10 --quick tests

# A scratch venv (/tmp/alphadpo-upgrade-venv) with the newest versions pyproject.toml's bounds allow, then
# the compat contract tests and the resume/restore tests there (scripts/upgrade-check.sh). UPGRADE_TESTS
# overrides the pytest arguments, e.g. UPGRADE_TESTS=tests/test_compat.py.
upgrade-check:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" scripts/upgrade-check.sh

clean:
	rm -rf outputs mlruns mlflow.db ray_results .pytest_cache
