# keyrelay — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROTO_SRC := proto/keyrelay/auth/v1/auth.proto
PROTO_OUT := services/keyrelay/auth/v1/auth_pb2.py
STAMP_PY := $(VENV)/.installed
STAMP_NODE := tests/oidc/node_modules/.installed

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP_PY): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3.12 ...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP_PY) ## Create .venv and install keyrelay with its dev dependencies

$(PROTO_OUT): $(PROTO_SRC) $(STAMP_PY)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=services --grpc_python_out=services \
	  --mypy_out=services --mypy_grpc_out=services $(PROTO_SRC)
	touch $@

gen: $(PROTO_OUT) ## Generate gRPC code and typed stubs from proto/

check-protos: $(STAMP_PY) ## Fail when the generated code differs from a fresh generation
	$(BIN)/python -m pytest -q tests/unit/test_generated_protos.py

$(STAMP_NODE): tests/oidc/package.json tests/oidc/package-lock.json
	cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node: $(STAMP_NODE) ## Install the OAuth test server (oidc-provider) for the tests

# The web page's browser test drives Debian's chromium (Playwright, no browser download).
browser: ## Install chromium for the browser test (apt-get, as root; once)
	@command -v chromium >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
	@chromium --version

test: $(PROTO_OUT) $(STAMP_NODE) ## Run the whole test suite (sets itself up)
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) --no-print-directory browser; \
	  else echo "note: no chromium (make browser installs it as root): the browser tests will skip"; fi; \
	fi
	$(BIN)/python -m pytest

deploy-check: $(PROTO_OUT) ## Check deploy/ and the Containerfile offline (kustomize, schemas, policies)
	$(BIN)/python -m pytest -q tests/deploy

lint: $(PROTO_OUT) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check services tests bench

typecheck: $(PROTO_OUT) ## mypy --strict
	$(BIN)/mypy

fmt: $(STAMP_PY) ## Format the code
	$(BIN)/ruff format services tests bench
	$(BIN)/ruff check --fix .

run: $(PROTO_OUT) ## Run the whole stack locally (Redis, auth service, gateway)
	$(BIN)/keyrelay dev $(ARGS)

bench: $(PROTO_OUT) $(STAMP_NODE) ## Run the benchmarks
	$(BIN)/python bench/auth_gettoken.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/redis_read.py

clean: ## Remove the virtualenv, node modules and generated code
	rm -rf $(VENV) tests/oidc/node_modules services/keyrelay/auth/v1/*_pb2*

.PHONY: help venv gen check-protos node browser test deploy-check lint typecheck fmt run bench clean
