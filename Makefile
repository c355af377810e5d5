# Two entry points (see README): `make serve` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
# CPU machines: pin torch to the CPU build (no multi-GB CUDA wheels). GPU users: `make CONSTRAINTS= ...`
CONSTRAINTS ?= constraints/cpu.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
BIN := $(VENV)/bin

.PHONY: install serve test lint bench-core

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_C) -e '.[test]'
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/alora-serve $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench-core: install
	$(BIN)/python -m loadtest.bench_core $(ARGS)

# Operations (see docs/operations.md): regenerate the Grafana dashboards from their spec; run the
# agent load test headless against LOADTEST_HOST (default: a local `make serve`), CSV + JSON under
# loadtest/results/
.PHONY: dashboards loadtest
LOADTEST_HOST ?= http://127.0.0.1:8000
LOADTEST_USERS ?= 16
LOADTEST_TIME ?= 5m

dashboards: install
	$(BIN)/python deploy/grafana/build_dashboards.py

loadtest: install
	mkdir -p loadtest/results
	$(BIN)/locust -f loadtest/locustfile.py --host $(LOADTEST_HOST) --headless -u $(LOADTEST_USERS) -r 4 \
		--run-time $(LOADTEST_TIME) \
		--stop-timeout 60 --csv loadtest/results/agents --json-file loadtest/results/agents $(ARGS)
