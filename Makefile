# keyrelay — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The newest Python >= 3.11 on PATH (override: make PYTHON=/path/to/python3.x ...).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
  command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
PROTO_SRC := proto/keyrelay/auth/v1/auth.proto
STAMP_PY := $(VENV)/.installed
STAMP_NODE := tests/oidc/node_modules/.installed

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

# Everything comes from the lock (exact versions, hashes checked); keyrelay itself
# is installed editable on top, with no dependency resolution of its own.
$(STAMP_PY): pyproject.toml requirements/dev.txt
	@test -n "$(PYTHON)" || { echo "keyrelay needs Python 3.11 or newer on PATH (python3.13, python3.12, python3.11 or python3); install one (Debian: apt-get install python3), or: make PYTHON=/path/to/python3.x ..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(STAMP_PY) ## Create .venv and install keyrelay with its dev dependencies

# The generated code is committed (so any pip install of the tree works without
# protoc); tests/unit/test_generated_protos.py fails when it is stale.
gen: $(STAMP_PY) ## Regenerate the gRPC code and typed stubs from proto/ (commit the result)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=services --grpc_python_out=services \
	  --mypy_out=services --mypy_grpc_out=services $(PROTO_SRC)

lock: $(STAMP_PY) ## Re-resolve requirements/*.txt from pyproject.toml (then: make venv)
	$(BIN)/uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.11 \
	  --extra dev --quiet --output-file requirements/dev.txt
	$(BIN)/uv pip compile pyproject.toml --universal --generate-hashes --python-version 3.11 \
	  --extra tracing --quiet --output-file requirements/runtime.txt

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

test: $(STAMP_PY) $(STAMP_NODE) ## Run the whole test suite (sets itself up)
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(MAKE) --no-print-directory browser; \
	  else echo "note: no chromium (make browser installs it as root): the browser tests will skip"; fi; \
	fi
	$(BIN)/python -m pytest

deploy-check: $(STAMP_PY) ## Check deploy/ and the Containerfile offline (kustomize, schemas, policies)
	$(BIN)/python -m pytest -q tests/deploy

lint: $(STAMP_PY) ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check services tests bench

typecheck: $(STAMP_PY) ## mypy --strict
	$(BIN)/mypy

fmt: $(STAMP_PY) ## Format the code
	$(BIN)/ruff format services tests bench
	$(BIN)/ruff check --fix .

run: $(STAMP_PY) ## Run the whole stack locally (Redis, auth service, gateway)
	$(BIN)/keyrelay dev $(ARGS)

bench: $(STAMP_PY) $(STAMP_NODE) ## Run the benchmarks
	$(BIN)/python bench/auth_gettoken.py
	$(BIN)/python bench/auth_events.py
	$(BIN)/python bench/auth_delivery_cost.py
	$(BIN)/python bench/gateway.py
	$(BIN)/python bench/gateway_limits.py
	$(BIN)/python bench/limits_store.py
	$(BIN)/python bench/redis_read.py

clean: ## Remove the virtualenv and the node modules
	rm -rf $(VENV) tests/oidc/node_modules

.PHONY: help venv gen lock check-protos node browser test deploy-check lint typecheck fmt run bench clean
