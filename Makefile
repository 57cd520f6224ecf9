# batchline: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint typecheck proto bench clean install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m server.cli demo --registry demo-registry

test: $(STAMP)
	@bash scripts/system-deps.sh
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m mypy
	$(PY) -m pytest -q

# The unit tests alone (no server process, no redis-server, no nginx): under 30 s.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(PY) -m mypy

proto: $(STAMP)
	$(PY) proto/generate.py

# First the field bench (perf_analyzer against batchline, echo, naive, Triton and MLServer; the
# peers install into .tools/ on first use), then the loadtest-driven scenarios and overload.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	PYTHON=$(PY) bash scripts/install_perf_analyzer.sh
	PYTHON=$(PY) bash scripts/install_peers.sh
	$(PY) -m bench.field
	$(PY) -m bench.run
	$(PY) -m bench.overload

clean:
	rm -rf $(VENV) demo-registry .pytest_cache .mypy_cache .ruff_cache
