# Two commands do everything on a fresh machine:
#   make serve   set up, register the committed models, start the service on :3000
#   make test    set up and run the test suite
# The virtual environment is rebuilt whenever pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PORT ?= 3000

.PHONY: setup test serve register lint format pipeline bench clean

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: $(INSTALLED)
	$(BIN)/pytest

serve: $(INSTALLED)
	$(BIN)/python -m training.register
	$(BIN)/bentoml serve service.service:ServingService --port $(PORT)

register: $(INSTALLED)
	$(BIN)/python -m training.register

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
