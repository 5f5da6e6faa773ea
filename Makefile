# Corral: the Makefile is the menu. `make help` lists every target.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PYTEST_WORKERS ?= 2
PROTO_SRC := $(shell find protos/corral -name '*.proto' 2>/dev/null | sort)
CONTEXTS := common identity session task runtime storage

.DEFAULT_GOAL := help

.PHONY: help
help: ## List every target
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Corral needs Python 3.11+"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: setup
setup: $(VENV)/.installed ## Create .venv and install Corral with its development tools

# $(call generate_protos,OUTDIR): protoc from grpcio-tools (pinned with grpcio) + mypy-protobuf stubs.
generate_protos = mkdir -p $(1) && $(PY) -m grpc_tools.protoc -Iprotos \
	--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	--python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) $(PROTO_SRC) && \
	for c in $(CONTEXTS); do if [ -d $(1)/corral/$$c ]; then touch $(1)/corral/$$c/__init__.py $(1)/corral/$$c/v1/__init__.py; fi; done

.PHONY: protos
protos: setup ## Regenerate the Python code of protos/ into corral/<context>/v1 (never edit it by hand)
	@rm -rf $(addprefix corral/,$(CONTEXTS))
	@$(call generate_protos,.)
	@echo "generated: $(addprefix corral/,$(CONTEXTS))"

.PHONY: check-protos
check-protos: setup ## Fail if the generated code under corral/<context>/v1 is stale
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call generate_protos,$$tmp) && \
	for c in $(CONTEXTS); do diff -r -x __pycache__ "$$tmp/corral/$$c" "corral/$$c" >/dev/null || \
	  { echo "generated code in corral/$$c is stale: run 'make protos' and commit it"; exit 1; }; done; \
	echo "generated code is fresh"

TS_SDK := libs/ts-sdk
CONSOLE := libs/web-console

$(TS_SDK)/node_modules/.installed: $(TS_SDK)/package-lock.json
	cd $(TS_SDK) && npm ci --no-audit --no-fund
	@touch $@

.PHONY: ts-sdk
ts-sdk: setup $(TS_SDK)/node_modules/.installed ## TypeScript SDK: npm ci, buf generate into libs/ts-sdk/src/gen, build dist/
	$(BIN)/buf generate --template buf.gen.ts.yaml
	cd $(TS_SDK) && npm run --silent build

.PHONY: check-ts-sdk
check-ts-sdk: ts-sdk ## Fail if the committed libs/ts-sdk/src/gen is not what buf generates
	@git diff --quiet -- $(TS_SDK)/src/gen && test -z "$$(git status --porcelain -- $(TS_SDK)/src/gen)" || \
	  { echo "libs/ts-sdk/src/gen is stale: run 'make ts-sdk' and commit it"; exit 1; }

$(CONSOLE)/node_modules/.installed: $(CONSOLE)/package-lock.json
	cd $(CONSOLE) && npm ci --no-audit --no-fund
	@touch $@

# Everything the console's bundle is made from: its own sources, the SDK's (generated code
# included) and the protos that code comes from. The stamp is written after a good build (the
# build empties dist/ first), so `make run` rebuilds only when one of these changed.
CONSOLE_INPUTS = $(PROTO_SRC) buf.gen.ts.yaml \
	$(shell find $(TS_SDK)/src $(CONSOLE)/src -type f 2>/dev/null) \
	$(TS_SDK)/package.json $(TS_SDK)/tsconfig.json \
	$(CONSOLE)/package.json $(CONSOLE)/tsconfig.json $(CONSOLE)/build.mjs

$(CONSOLE)/dist/.built: $(VENV)/.installed $(TS_SDK)/node_modules/.installed \
		$(CONSOLE)/node_modules/.installed $(CONSOLE_INPUTS)
	$(BIN)/buf generate --template buf.gen.ts.yaml
	cd $(TS_SDK) && npm run --silent build
	cd $(CONSOLE) && npm run --silent build
	@touch $@

.PHONY: console
console: ts-sdk $(CONSOLE)/node_modules/.installed ## Web console: type-check and bundle into libs/web-console/dist
	cd $(CONSOLE) && npm run --silent build
	@touch $(CONSOLE)/dist/.built

.PHONY: openapi
openapi: setup ## Regenerate the OpenAPI documents of the REST surface (openapi/, from the protos' HTTP rules)
	$(PY) openapi/generate.py

.PHONY: check-openapi
check-openapi: setup ## Fail if the committed OpenAPI documents are stale (needs Debian's golang-grpc-gateway)
	$(PY) openapi/generate.py --check

.PHONY: go-client
go-client: setup ## Generate the Go client from the protos and build build/go/corral-example (Debian's Go packages, offline)
	$(PY) clients/go/build.py build/go/corral-example --keep build/go/gopath

.PHONY: buf-lint
buf-lint: setup ## buf lint (STANDARD) on protos/
	$(BIN)/buf lint

.PHONY: breaking
breaking: setup ## buf breaking against main (FILE)
	@if git rev-parse --verify -q main >/dev/null && [ -n "$$(git ls-tree -r main --name-only -- protos)" ]; then \
	  $(BIN)/buf breaking --against '.git#branch=main'; else echo "main has no protos yet: nothing to compare"; fi

.PHONY: lint
lint: setup ## ruff (lint + format check)
	$(BIN)/ruff check services libs clients tests
	$(BIN)/ruff format --check services libs clients tests

.PHONY: fmt
fmt: setup ## Format the code with ruff
	$(BIN)/ruff check --fix services libs clients tests
	$(BIN)/ruff format services libs clients tests

.PHONY: typecheck
typecheck: setup ## mypy --strict over services and libs
	$(BIN)/mypy -p corral.libs -p corral.services -p corral.client

.PHONY: pytest
pytest: setup ## Run the test suite (PostgreSQL/Redis from CORRAL_TEST_POSTGRES_URL / CORRAL_TEST_REDIS_URL)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

.PHONY: faults
faults: setup ## Fault scenarios on a production-like topology started by the tests (tests/faults)
	$(BIN)/pytest -q tests/faults $(PYTEST_ARGS)

.PHONY: test
test: setup lint typecheck buf-lint breaking check-protos check-ts-sdk check-openapi console pytest ## Everything CI checks

.PHONY: bench
bench: setup ## Benchmarks, each a ratio against a baseline measured in the same run
	$(PY) -m tests.bench.bench_kit
	$(PY) -m tests.bench.bench_fanout
	$(PY) -m tests.bench.bench_storage
	@log=$$(mktemp); $(PY) -m tests.bench.bench_agent 2>$$log || { tail -20 $$log; rm -f $$log; exit 1; }; rm -f $$log

.PHONY: run
run: setup ## Bring the whole platform up on embedded defaults (SQLite, in-process hub)
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(CONSOLE)/dist/.built; \
	  else echo "npm not found: starting without the web console (gRPC, grpc-web, REST and corral chat still work)"; fi
	$(BIN)/corral dev

.PHONY: migrate
migrate: setup ## Run every service's migrations against the configured databases
	$(BIN)/corral migrate

.PHONY: deploy-config
deploy-config: setup ## Re-render the committed production Envoy files (deploy/envoy, deploy/k8s/envoy-config.yaml)
	$(PY) deploy/envoy/render_production.py

.PHONY: clean
clean: ## Remove the virtualenv, caches and the local data folder
	rm -rf $(VENV) .corral .mypy_cache .ruff_cache .pytest_cache build *.egg-info test-artifacts \
		$(TS_SDK)/node_modules $(TS_SDK)/dist $(CONSOLE)/node_modules $(CONSOLE)/dist
