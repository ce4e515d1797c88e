# The two README commands.  Each installs exactly what it needs from the committed lock
# (requirements/constraints.txt) into a local virtualenv, so a fresh machine gets the
# versions CI tested.  `make lock` refreshes the lock after a pyproject.toml change.
PYTHON ?= python3
VENV := .venv
ARCHIVE_VENV := .venv-archive
PIP := $(VENV)/bin/pip install --quiet --disable-pip-version-check
LOCK := requirements/constraints.txt

.PHONY: serve test check lock bench bench-tools test-tools proofs clean openapi

serve: $(VENV)/.runtime
	mkdir -p archive
	$(VENV)/bin/cartd serve

test: $(VENV)/.test $(ARCHIVE_VENV)/.installed test-tools
	$(VENV)/bin/pytest

check: $(VENV)/.test
	$(VENV)/bin/ruff check src tests bench alembic
	$(VENV)/bin/mypy src

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(VENV)/bin/python pyproject.toml $(LOCK)
	$(PIP) -c $(LOCK) -e .
	touch $@

$(VENV)/.test: $(VENV)/bin/python pyproject.toml $(LOCK)
	$(PIP) -c $(LOCK) -e '.[test]'
	touch $@ $(VENV)/.runtime

# The reference pacifica-archiveinterface needs its own, fully pinned environment.
$(ARCHIVE_VENV)/.installed: requirements/archiveinterface.txt
	$(PYTHON) -m venv $(ARCHIVE_VENV)
	$(ARCHIVE_VENV)/bin/pip install --quiet --disable-pip-version-check \
		-r requirements/archiveinterface.txt
	touch $@

# The committed OpenAPI document; tests/test_openapi.py fails when it drifts from the code.
openapi: $(VENV)/.runtime
	mkdir -p docs
	$(VENV)/bin/cartd openapi --output docs/openapi.json

# The reliability proofs at full size; `make test` runs a short version of each.
proofs: $(VENV)/.test
	$(VENV)/bin/python bench/soak.py
	$(VENV)/bin/python bench/crashloop.py --kills 50
	$(VENV)/bin/python bench/load.py
	$(VENV)/bin/python bench/outage.py

# The benchmark suite (bench/suite.py; README "Performance"): the report and plots go to
# bench/results/.  nginx and wrk are the references, from Debian.  BENCH_ARGS passes options.
bench: $(VENV)/.bench $(ARCHIVE_VENV)/.installed bench-tools
	$(VENV)/bin/python bench/suite.py $(BENCH_ARGS)

bench-tools:
	@command -v nginx >/dev/null && command -v wrk >/dev/null && command -v curl >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx-light wrk curl; }

# The tests check zip bundles with Info-ZIP unzip and bsdtar, and smoke-run the benchmarks.
test-tools: bench-tools
	@command -v unzip >/dev/null && command -v bsdtar >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends unzip libarchive-tools; }

$(VENV)/.bench: $(VENV)/.test
	$(PIP) -c $(LOCK) -e '.[test,bench]'
	touch $@

lock:
	rm -rf /tmp/cartd-lock && $(PYTHON) -m venv /tmp/cartd-lock
	/tmp/cartd-lock/bin/pip install --quiet -e '.[test,bench]'
	/tmp/cartd-lock/bin/pip freeze --exclude-editable | sort > $(LOCK)

clean:
	rm -rf $(VENV) $(ARCHIVE_VENV)
