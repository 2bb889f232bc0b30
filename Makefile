# Two commands on a fresh machine: `make demo` (train -> eval -> export -> verify on built-in data) and
# `make test`.  Both create or reuse the virtual environment in $(VENV).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hetero-installed
OUT ?= runs/quickstart

.PHONY: demo test test-fast omniglot bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetero run examples/quickstart.yaml --out $(OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

# The reference pages (from the parser, the config schema, the profiles) and the results page (from the
# records in benchmarks/results/) are regenerated, then the site is built; --strict fails on a broken link.
docs: $(STAMP)
	$(PY) docs/gen_reference.py
	$(PY) benchmarks/render_results.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

omniglot: $(STAMP)
	$(VENV)/bin/hetero run examples/omniglot.yaml --out runs/omniglot --overwrite

clean:
	rm -rf runs .pytest_cache site
