# The two commands a newcomer needs are `make demo` and `make test`; everything else is for developers.
# Every target that runs Python creates and reuses .venv by itself (re-installed when pyproject changes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
COMPOSE = $(shell $(BIN)/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
SEEDS  ?= 50

.PHONY: help venv services demo test test-unit test-integration test-faults check lint typecheck complexity compose-config chaos bench clean

help:
	@echo "make demo    the whole relay on its built-in Qonto and Cegid Loop sandboxes"
	@echo "make test    unit + integration tests (real PostgreSQL and RabbitMQ) and a few chaos seeds"
	@echo "make check   ruff, mypy --strict, radon (complexity), docker-compose.yml validation"
	@echo "make chaos   the fault-injection suite over SEEDS=$(SEEDS) seeds"
	@echo "make bench   benchmarks side by side with their ceilings; writes bench/results.json"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

services:
	.ci/services

demo: $(STAMP) services
	$(BIN)/relay demo

# The tests run in parallel (pytest-xdist; each has its own database and queue prefix), then the
# fault tests, which restart PostgreSQL and RabbitMQ, after the others and one at a time.
TEST_WORKERS ?= 2

test: $(STAMP) services
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --cov=relay --cov=consumers --cov-report=
	$(BIN)/python -m pytest -q -m fault --cov=relay --cov=consumers --cov-append \
		--cov-report=term:skip-covered

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

test-integration: $(STAMP) services
	$(BIN)/python -m pytest -q tests/integration

test-faults: $(STAMP) services
	$(BIN)/python -m pytest -q -m fault

lint: $(STAMP)
	$(BIN)/ruff format --check relay consumers tests bench
	$(BIN)/ruff check relay consumers tests bench

typecheck: $(STAMP)
	$(BIN)/mypy relay consumers

# no function above cyclomatic complexity 20 (radon rank D or worse) in relay/ or consumers/
complexity: $(STAMP)
	$(BIN)/python .ci/complexity relay consumers

compose-config: $(STAMP)
	RELAY_SECRET_KEY=check RELAY_ADMIN_TOKEN=check "$(COMPOSE)" -f docker-compose.yml config -q

check: lint typecheck complexity compose-config

chaos: $(STAMP) services
	RELAY_CHAOS_SEEDS=$(SEEDS) RELAY_CHAOS_REPORT=chaos-results.json \
		$(BIN)/python -m pytest -q -s -m chaos -p no:cacheprovider --basetemp=chaos-logs \
		tests/integration/test_chaos.py

bench: $(STAMP) services
	bench/ensure-wrk
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
