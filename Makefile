# Two commands on a fresh machine: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of PyTorch that lies on this machine's disk; on a GPU machine see README "Installing by hand, and on GPUs".
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test test-quick figures upgrade-check clean

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
# Two pytest workers (pytest-xdist): the scenario tests spend part of their time waiting (Ray nodes starting, a
# run held at a step, a server killed), so two share the 2 cores. Each test is a unit of work, slowest first,
# except a module's tests that share a module-scoped fixture, which stay together (tests/conftest.py; the
# times come from tests/durations.json, refreshed with scripts/test_durations.py). PARALLEL= runs the suite
# in one process.
PARALLEL ?= -n 2 --dist loadscope --no-loadscope-reorder

test: setup
	timeout --signal=INT --kill-after=120 $(SUITE_LIMIT) \
	  $(BIN)/python -m pytest -q -rfE --durations=25 --timeout=$(PER_TEST_TIMEOUT) $(PARALLEL) $(PYTEST_ARGS) tests

# The inner loop: no Ray, cluster, server or training run (tests/conftest.py --quick).
test-quick: setup
	$(BIN)/python -m pytest -q -rfE --durations=10 --quick tests

# Every figure and claim the README and docs quote, over FIGURE_SEEDS seeds of the whole pipeline (SFT reference
# included), in scratch directories under /tmp/alphadpo-figures; prints per-seed values, ranges and each claim as
# HOLDS (k/n) or DOES NOT HOLD, and writes the expectations `alphadpo-ray self-check` reads. CPU-heavy: about
# 10 min per seed on 2 idle cores, far longer on a busy machine; re-running continues where it stopped.
FIGURE_SEEDS ?= 5
FIGURE_ARGS ?=
figures: setup
	$(BIN)/python benchmarks/readme_figures.py --seeds $(FIGURE_SEEDS) $(FIGURE_ARGS) \
	  --write-expected alphadpo_ray/training/expected_figures.json

# A scratch venv (/tmp/alphadpo-upgrade-venv) with the newest versions pyproject.toml's bounds allow, then
# the compat contract tests and the resume/restore tests there (scripts/upgrade-check.sh). UPGRADE_TESTS
# overrides the pytest arguments, e.g. UPGRADE_TESTS=tests/test_compat.py.
upgrade-check:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" scripts/upgrade-check.sh

clean:
	rm -rf outputs mlruns mlflow.db ray_results .pytest_cache
