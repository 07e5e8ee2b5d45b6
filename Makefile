# The README's two commands: `make demo` (set up + the main job) and `make test`.
# Both are idempotent: set-up is skipped once .venv/.installed is newer than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= outputs/demo

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	bash scripts/demo.sh $(BIN) $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check jaxbooth tests scripts
