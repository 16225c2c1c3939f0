# The two commands the README opens with: `make run` and `make test`.
# Both create .venv when it is missing and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck pytest bench clean test-all wheel-test

$(STAMP): pyproject.toml setup.py pool/guest/_core.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/run_demo.py

demo-guest: $(STAMP)
	$(BIN)/python -m pool.guest demo

lint: $(STAMP)
	$(BIN)/ruff check pool daemon hv_netvsc_sim tests bench scripts
	$(BIN)/ruff format --check pool daemon hv_netvsc_sim tests bench scripts

typecheck: $(STAMP)
	$(BIN)/mypy pool daemon hv_netvsc_sim

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test: lint typecheck pytest

# The install users get: build the wheel, install it into a fresh venv outside the
# repository, run every command from there (scripts/wheel_check.py). Run by .ci/run.
wheel-test:
	$(PY) scripts/wheel_check.py --out dist

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		echo "wrk not installed: bench_daemon.py falls back to its Python load generator"
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Reliability (issue 7): not in the default test run.
.PHONY: soak fuzz load
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python bench/soak.py --duration $(SOAK_SECONDS)
FUZZ_EXAMPLES ?= 500
FUZZ_SECONDS ?= 900
fuzz: $(STAMP)
	SHAREDPOOL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) SHAREDPOOL_FUZZ_SECONDS=$(FUZZ_SECONDS) SHAREDPOOL_FUZZ_RANDOM=1 \
		$(BIN)/python -m pytest -q -s tests/test_reliability_fuzz.py
load: $(STAMP)
	$(BIN)/python bench/load.py --cycles 1000
