# The two commands of the README: `make test` and `make simulate`. Both create the virtual
# environment and install the pinned dev environment (constraints.txt) on a fresh machine.
#   make test      ruff, mypy and the fast tests: every test not marked `slow`, with one
#                  smoke test of Flower's simulation engine (tests/test_flower_simulation.py)
#   make test-all  ruff, mypy and every test, the `slow` ones too (whole-scenario runs whose
#                  properties faster tests also pin; marker registered in pyproject.toml);
#                  CI (.ci/run) runs `make test` and then `make unit-slow`, i.e. everything
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install test test-all lint typecheck unit unit-all unit-slow e2e bench bench-full gpu-check simulate clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy unicon_model unicon_cli client server simulations

# The tests not marked slow (the one Flower-engine smoke test is not marked).
unit: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# Every test, the slow ones included.
unit-all: $(STAMP)
	$(BIN)/pytest -q

# Only the tests marked slow (what `make test` leaves out).
unit-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

test: lint typecheck unit

test-all: lint typecheck unit-all

# The deployment end to end (TLS, node auth, real SuperNodes, kill/resume): several minutes.
e2e: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider deploy/e2e_test.py

# Benchmarks side by side; prints tables and writes bench/results.json. Learning (BWT vs
# naive, federated/centralised, DP utility at eps 1/4/8/inf) on the quick scenario, and the
# system ones (upload bytes, SecAgg+ vs plain, scale to 100 sites, analytic head): minutes.
bench: $(STAMP)
	$(BIN)/python -m simulations.bench --quick-learning

# Issue 11's targets on the default scenario: UNICON, naive, EWC, LwF, single-task,
# centralised, the MONAI BasicUNet and the no-PET route side by side (the system, DP,
# analytic, prompt and new-structure benchmarks are make bench's; all of them on the
# default scenario: python -m simulations.bench, about 1.5 h on 2 cores by estimate).
bench-full: $(STAMP)
	$(BIN)/python -m simulations.bench --only targets

# The trainer's CUDA paths (float32, bf16 and fp16 autocast, DP-SGD) checked and timed
# against the CPU on a machine with a GPU; writes bench/gpu_check.json (exit 2 without CUDA).
gpu-check: $(STAMP)
	$(BIN)/python -m simulations.gpu_check --out bench/gpu_check.json

# The UNICON scenario over generated hospitals on Flower's simulation engine; report in
# ./report (report.md, results.json, plots). SIMULATE_ARGS=--quick for a run under two minutes.
simulate: $(STAMP)
	$(BIN)/unicon simulate --out report $(SIMULATE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
