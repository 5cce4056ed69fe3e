# Two commands set up everything on a fresh machine (README.md):
#   make serve   create/refresh .venv, install vibrato, run the server with the runbook's flags
#                (docs/CONTRACT.md §7.2, runbook §1)
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

.PHONY: serve test test-debug bench install install-test clean

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

# hnswlib ships only a source archive; its build needs pybind11 (installs run without build isolation).
$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) install -q pybind11==3.1.0
	$(PIP) install -q --no-build-isolation -e '.[test,bench]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

serve: $(VENV)/.installed
	$(VENV)/bin/vibrato serve-v2 $(SERVE_ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The native tests once more against a build with Cython's bounds/wraparound/initialisation checks
# on (VIBRATO_DEBUG_CYTHON=1), installed into its own venv (not in place) so the release build in
# .venv is untouched. pytest runs from tests/ so `import vibrato` finds the installed debug build.
DEBUG_VENV ?= .venv-debug
NATIVE_TESTS := test_kernels.py test_hnsw.py test_pq.py test_segment.py test_segment_fuzz.py
test-debug:
	$(PYTHON) -m venv $(DEBUG_VENV)
	$(DEBUG_VENV)/bin/python -m pip install -q $(BUILD_DEPS)
	rm -rf build/temp.* build/lib.*
	VIBRATO_DEBUG_CYTHON=1 $(DEBUG_VENV)/bin/python -m pip install -q --no-build-isolation '.[test]'
	rm -rf build/temp.* build/lib.*
	cd tests && ../$(DEBUG_VENV)/bin/python -c "import vibrato, sys; sys.exit('debug run would test the source tree' if 'site-packages' not in vibrato.__file__ else 0)"
	cd tests && ../$(DEBUG_VENV)/bin/pytest -p no:cacheprovider -q $(NATIVE_TESTS) $(PYTEST_ARGS)

# Benchmarks report, never assert. numpy is compared at its best: the OPENBLAS_* tuning variables
# this machine sets are removed for the kernel/PQ command only. BENCH_N sizes the engine benchmark
# (the 1M-vector figures in perf/README.md used BENCH_N=1000000). The HTTP benchmark needs a
# `chroma` executable (pip install chromadb==1.5.9, a separate venv is fine): CHROMA_BIN=... .
BENCH_N ?= 200000
bench: $(VENV)/.installed-bench
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) -m pytest perf/bench_kernels.py perf/bench_pq.py \
		-o python_files="bench_*.py" -p no:cacheprovider -q -s $(PYTEST_ARGS)
	$(PY) perf/bench_hnsw.py
	VIBRATO_BENCH_N=$(BENCH_N) $(PY) perf/bench_engine.py
	$(PY) perf/bench_json_decode.py
	@if [ -n "$$CHROMA_BIN" ] || command -v chroma >/dev/null; then $(PY) perf/bench_http.py; \
	else echo "bench_http skipped: no chroma executable (set CHROMA_BIN)"; fi

clean:
	rm -rf build $(VENV) vibrato/_native/*.so vibrato/_native/*.c *.egg-info
