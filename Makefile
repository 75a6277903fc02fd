# Two commands on a fresh machine: `make run` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build of PyTorch that lies on this machine's disk; on a GPU machine see README "Installing on GPUs".
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/alphadpo-ray sweep

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf outputs mlruns mlflow.db ray_results .pytest_cache
