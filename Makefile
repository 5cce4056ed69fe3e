# Two commands set up everything on a fresh machine (README.md):
#   make serve   create/refresh .venv, install vibrato, run the server from the runbook
#   make test    create/refresh .venv, install vibrato with its test extra, run the test suite
# `make bench` runs the benchmarks under perf/.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUILD_DEPS := setuptools==84.2.1 cython==3.3.1 numpy==2.4.6 wheel
NATIVE_SRC := $(wildcard vibrato/_native/*.pyx vibrato/_native/*.pxd include/vibrato/*.h include/vibrato/impl/*.h)

DATA_DIR ?= ./vibrato_data
PORT ?= 8080
HOST ?= 0.0.0.0
SERVE_ARGS ?= --data-dir $(DATA_DIR) --collection default --dim 128 --port $(PORT) --host $(HOST) \
	--checkpoint-interval-secs 30 --compaction-interval-secs 180 --orphan-ttl-hours 168 \
	--audio-colocated true --public-health-metrics true --bootstrap-admin-key true
PYTEST_ARGS ?=

.PHONY: serve test bench install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# The stamp files re-run the install whenever packaging or native sources change.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py $(NATIVE_SRC)
	$(PIP) install -q $(BUILD_DEPS)
	$(PIP) install -q --no-build-isolation -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q --no-build-isolation -e '.[test]'
	@touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -q --no-build-isolation -e '.[test,bench]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: $(VENV)/.installed
	$(VENV)/bin/vibrato serve-v2 $(SERVE_ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(PY) -m pytest perf $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) vibrato/_native/*.so vibrato/_native/*.c *.egg-info
