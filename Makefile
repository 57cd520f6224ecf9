# batchline: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck proto bench clean install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m server.cli demo --registry demo-registry

test: $(STAMP)
	@command -v redis-server >/dev/null || { echo "redis-server is required for the tests (apt-get install redis-server)"; exit 1; }
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { echo "nginx is required for the tests (apt-get install nginx-light)"; exit 1; }
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(PY) -m mypy

proto: $(STAMP)
	$(PY) proto/generate.py

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.run
	$(PY) -m bench.overload

clean:
	rm -rf $(VENV) demo-registry .pytest_cache .mypy_cache .ruff_cache
