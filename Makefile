# fedstream developer commands. `make run` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CLIENTS ?= 4
ROUNDS ?= 10
OUT ?= runs/digits

.PHONY: install run test test-fast lint typecheck proto proto-check bench bench-quick \
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
	$(BIN)/python -m pytest -q

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

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

cluster-up:
	docker compose -f docker/docker-compose.yml up --build -d

cluster-down:
	docker compose -f docker/docker-compose.yml down

clean:
	rm -rf .proto-build build *.egg-info .pytest_cache .mypy_cache
