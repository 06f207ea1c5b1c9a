# The single entry point. `make demo` and `make test` each set up .venv first (idempotent).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ratchet-installed
# Extra pip arguments for torch, e.g. a CPU-only index on machines without a local CPU wheel.
TORCH_PIP_ARGS ?=
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1 GX_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and exact: a range would pull a multi-GB CUDA build on a CPU machine.
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/ratchet demo

lint: setup
	$(BIN)/ruff check .

# Two processes side by side on the 2 cores: the end-to-end story (the long pole, about six
# minutes) and everything else. The story's output is printed when both have ended.
test: lint
	@rm -f .e2e.log .e2e.rc; \
	( $(BIN)/python -m pytest -m "not slow" tests/e2e > .e2e.log 2>&1; echo $$? > .e2e.rc ) & \
	$(BIN)/python -m pytest -m "not slow" tests/unit tests/data tests/integration; rest=$$?; \
	wait; echo "--- end-to-end story (tests/e2e) ---"; cat .e2e.log; e2e=$$(cat .e2e.rc); \
	rm -f .e2e.log .e2e.rc; test $$rest -eq 0 && test $$e2e -eq 0

test-all: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf demo-workspace .pytest_cache .ruff_cache
