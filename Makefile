# Two commands for a newcomer: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: run test lint test-reliability bench demo clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[service,test,bench]'
	touch $(INSTALLED)

run: $(INSTALLED)  ## start the service on 127.0.0.1:8000 (embedded PostgreSQL under .data/ unless DATABASE_URL)
	$(PY) -m app serve

lint: $(INSTALLED)
	$(VENV)/bin/ruff check app tests migrations bench devtools
	$(VENV)/bin/ruff format --check app tests migrations bench devtools
	$(VENV)/bin/mypy app

test: lint  ## ruff, mypy and the whole pytest suite against a real PostgreSQL
	$(PY) -m pytest

bench: $(INSTALLED)  ## the benchmark: fan-out, throughput against a bare baseline, SQL per job, memory (docs/BENCHMARK.md)
	$(PY) -m bench

demo: $(INSTALLED)  ## embedded PostgreSQL, the service and two agents on temporary folders: a removal, then one with a host down
	$(PY) -m devtools.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
