# stream-knn: every target bootstraps what it needs (virtualenv, packages, Kafka jars).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: install demo test test-unit test-integration lint bench bench-quick bench-record broker-start broker-stop clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev,hnsw]'
	@touch $(STAMP)

install: $(STAMP)

## The main job on a local single-node broker: broker, topics, worker, synthetic producer.
demo: install
	bash scripts/demo.sh

## The whole suite: unit tests, then integration tests against a real broker (and a
## secured one, certificates by openssl), a real Prometheus and headless Chromium.
test: install
	bash scripts/install-prometheus.sh
	bash scripts/install-chromium.sh
	bash scripts/install-openssl.sh
	$(BIN)/python -m pytest -q tests

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

test-integration: install
	$(BIN)/python -m pytest -q -m integration tests

## Exactly what CI's lint step runs.
lint: install
	$(BIN)/ruff check stream_knn tests benchmarks
	$(BIN)/ruff format --check stream_knn tests benchmarks
	$(BIN)/mypy

## Every scenario, each figure beside its reference from the same run (under 15 minutes).
bench: install
	$(BIN)/python -m benchmarks.run --full

## The regression guard: fails on a guarded ratio 30% below benchmarks/baseline.json.
bench-quick: install
	$(BIN)/python -m benchmarks.run --quick

## A quick run that rewrites benchmarks/baseline.json with its ratios.
bench-record: install
	$(BIN)/python -m benchmarks.run --quick --record

broker-start: install
	$(BIN)/stream-knn broker start

broker-stop: install
	$(BIN)/stream-knn broker stop

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
