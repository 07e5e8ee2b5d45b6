# The README's two commands: `make demo` (set up + the main job) and `make test`.
# Both are idempotent: set-up is skipped once .venv/.installed is newer than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= outputs/demo
# Test processes: the suite is mostly single-threaded XLA compiles, so one worker per core; a
# file's tests stay in one worker (its module fixtures build once).
TEST_WORKERS ?= 2

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	bash scripts/demo.sh $(BIN) $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(BIN)/ruff check jaxbooth tests scripts
