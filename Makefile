# make test : create .venv when missing, install kcdlib with its dev tools, lint, run the suite.
# make book : set-up, run every notebook on the smoke profile, render the HTML into _build/html.
# make lab  : set-up with JupyterLab and jupytext, open notebooks/ in JupyterLab (its .md files as notebooks).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint book lab clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check kcdlib tests benchmarks
	$(BIN)/ruff format --check kcdlib tests benchmarks

# Two worker processes, one test file each at a time (a file's fixtures stay in one process): about 4 minutes on
# 2 cores instead of 5.5 one after another. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

book: $(STAMP)
	$(BIN)/kcd book --profile smoke

# JupyterLab reads the project's settings (.jupyter/labconfig: jupytext's notebook is the default viewer of .md
# files) from JUPYTER_CONFIG_PATH; without them it opens the text notebooks as plain text.
lab: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[course]'
	JUPYTER_CONFIG_PATH=$(CURDIR)/.jupyter $(BIN)/jupyter lab notebooks

clean:
	rm -rf _build runs-smoke book/artefacts .pytest_cache
