# The single entry point. `make demo` and `make test` each set up .venv first (idempotent).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ratchet-installed
# Extra pip arguments for torch, e.g. a CPU-only index on machines without a local CPU wheel.
TORCH_PIP_ARGS ?=
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# Bytecode is cached on first import (set-up skips compiling all of site-packages, see below);
# some machines set PYTHONDONTWRITEBYTECODE, which would make every process compile torch anew.
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup browser demo test test-all test-faults lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exact: a range would pull a multi-GB CUDA build on a CPU machine.
	# --no-compile: bytecode for the modules actually imported is written on first use instead.
	$(BIN)/python -m pip install -q --no-compile $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install -q --no-compile -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/ratchet demo

lint: setup
	$(BIN)/ruff check .

# The browser check after the story (tests/e2e/test_story.py) drives Debian's Chromium; where it
# cannot be installed (not root, no apt) the check is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	( command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && timeout 300 sh -c \
	  'apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)' ) || \
	echo "Chromium not installed: the browser check will be skipped"

# Two lanes side by side on the 2 cores, split so that each takes about as long (about 10 min
# each on this project's 2-core machines): the end-to-end story and the training tests in one;
# the real-server tests, the input corpus and the other unit tests in the other; the fault
# suite's quick subset split between them. The first lane's output is printed when both end.
LANE_A := tests/e2e tests/unit/test_training.py tests/faults/test_faults.py \
	tests/faults/test_outputs.py tests/faults/test_interrupt.py tests/integration/test_serving.py
test: lint browser
	@rm -f .lane.log .lane.rc; \
	( $(BIN)/python -m pytest -m "not slow" --durations=12 $(LANE_A) > .lane.log 2>&1; \
	  echo $$? > .lane.rc ) & \
	$(BIN)/python -m pytest -m "not slow" --durations=12 tests/integration tests/data tests/unit \
		tests/faults \
		$(foreach t,$(LANE_A),--ignore=$(t)); rest=$$?; \
	wait; echo "--- $(LANE_A) ---"; cat .lane.log; lane=$$(cat .lane.rc); \
	rm -f .lane.log .lane.rc; test $$rest -eq 0 && test $$lane -eq 0

test-all: lint browser
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The fault suite: seeded kills and interrupts at every stage, concurrent writers, servers
# killed mid-run, a full disk, corruptions; tens of minutes (its quick subset is in `make test`).
test-faults: setup
	$(BIN)/python -m pytest -m faults tests/faults tests/unit/test_training.py

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf demo-workspace .pytest_cache .ruff_cache
