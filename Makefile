# fedstream developer commands. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLIENTS ?= 4
ROUNDS ?= 10
OUT ?= runs/digits

.PHONY: install run test test-cluster test-fast lint typecheck proto proto-check bench bench-quick \
        cluster-up cluster-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## A local federation: one fl-server and $(CLIENTS) fl-client processes on the digits data.
run: $(STAMP)
	$(BIN)/fl-local --clients $(CLIENTS) --rounds $(ROUNDS) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster"

## Real clusters (needs root): installs docker.io, docker-compose, debootstrap and Slurm when
## missing, starts dockerd (and stops it), builds the images once (cached), runs them.
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/integration

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy common server client

## Regenerate common/pb/ from proto/ (generated code is committed).
proto: $(STAMP)
	rm -rf .proto-build && mkdir -p .proto-build
	$(BIN)/python -m grpc_tools.protoc -Ifedstream/common/pb=proto \
	    --python_out=.proto-build --grpc_python_out=.proto-build --pyi_out=.proto-build \
	    proto/*.proto
	cp .proto-build/fedstream/common/pb/*.py .proto-build/fedstream/common/pb/*.pyi common/pb/
	rm -rf .proto-build

## Fail when common/pb/ is not what `make proto` would write.
proto-check: $(STAMP)
	rm -rf .proto-build && mkdir -p .proto-build
	$(BIN)/python -m grpc_tools.protoc -Ifedstream/common/pb=proto \
	    --python_out=.proto-build --grpc_python_out=.proto-build --pyi_out=.proto-build \
	    proto/*.proto
	for f in .proto-build/fedstream/common/pb/*; do \
	    cmp -s $$f common/pb/$$(basename $$f) || { echo "stale generated code: $$f; run make proto"; exit 1; }; \
	done
	rm -rf .proto-build

## Benchmarks B1..B7 (benchmarks/README.md); results in benchmarks/results/<date>/.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.run --quick

## A docker-compose cluster (docker/): one fl-server and FL_CLIENTS (default 2) fl-client
## containers. `make cluster-up FL_CLIENTS=4`; one client per GPU:
## `make cluster-up CLUSTER_FILE=docker/docker-compose.gpu.yml`. Volumes outlive cluster-down.
COMPOSE ?= docker compose
CLUSTER_FILE ?= docker/docker-compose.yml
# The GPU file is a compose project of its own, so its volumes never mix with the CPU ones.
CLUSTER_PROJECT ?= $(if $(findstring gpu,$(CLUSTER_FILE)),fedstream-gpu,fedstream)

cluster-up:
	$(COMPOSE) -p $(CLUSTER_PROJECT) -f $(CLUSTER_FILE) up --build -d

cluster-down:
	$(COMPOSE) -p $(CLUSTER_PROJECT) -f $(CLUSTER_FILE) down

clean:
	rm -rf .proto-build build *.egg-info .pytest_cache .mypy_cache
