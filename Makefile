# cryo-forum: `make demo` runs the main job on the built-in example, `make test` runs the tests.
# Both create a virtual environment inside the checkout (.venv) and install everything into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	# the demo's own folder is rebuilt on every run
	rm -rf $(DEMO_OUT)
	$(BIN)/cryo-forum demo --out $(DEMO_OUT)

test: $(STAMP)
	# two workers, one per core; a file's tests stay on one worker, so module fixtures are built once
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests data_prep bench

clean:
	rm -rf $(VENV) $(DEMO_OUT) build src/*.egg-info
