# The habits a newcomer reaches for first. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-fast chaos availability soak lint fmt typecheck clean validate-deploy kill-leader

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the local failover demo on embedded etcd + Postgres (main command)
demo: $(STAMP)
	$(BIN)/paydispatch demo

## test: the whole suite, chaos tests included (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest

## soak: 100,000 payments under a seeded chaos mix (a fault every ~10 s), ends with a verdict
soak: $(STAMP)
	$(BIN)/python -m load chaos --rate 250 --duration 400 --kills 40 --seed 7 \
		--report artifacts/soak/report.json

## availability: the availability figures of the README, each leader fault three times
availability: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH sh load/run-availability.sh

## test-unit: the fast tier: pure logic, no process, server or database (seconds)
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

## test-fast: everything but the slow chaos tests
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not chaos"

## chaos: only the slow fault-injection tests
chaos: $(STAMP)
	$(BIN)/python -m pytest -m chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

## validate-deploy: compose (Compose's own parser), Dockerfile (hadolint), haproxy -c, Kubernetes (kustomize, kubernetes-validate, checkov)
validate-deploy: $(STAMP)
	PYTHON=$(BIN)/python .ci/validate-deploy

## kill-leader: SIGKILL the leader's container of the docker compose deployment
kill-leader:
	@node=$$(curl -fsS -H "Authorization: Bearer $${PAYDISPATCH_API_KEY:-demo-api-key-not-a-secret}" \
		http://127.0.0.1:8080/v1/leader | python3 -c 'import json, sys; print(json.load(sys.stdin)["node_id"])'); \
	case "$$node" in replica-[0-9]*) ;; *) echo "unexpected leader '$$node'" >&2; exit 1;; esac; \
	echo "killing the leader's container: $$node"; \
	docker compose kill -s SIGKILL "$$node"
