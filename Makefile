# Two commands on a fresh machine: `make demo` (train -> eval -> export -> verify on built-in data) and
# `make test`.  Both create or reuse the virtual environment in $(VENV).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hetero-installed
OUT ?= runs/quickstart

.PHONY: demo test test-fast omniglot bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	$(PY) -m pip install --quiet -e '.[timm]'  # after the rest: see the timm extra in pyproject.toml
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetero run examples/quickstart.yaml --out $(OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

omniglot: $(STAMP)
	$(VENV)/bin/hetero run examples/omniglot.yaml --out runs/omniglot --overwrite

clean:
	rm -rf runs .pytest_cache
