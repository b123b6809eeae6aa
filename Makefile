# The two commands of the README: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The dashboard's browser test drives Debian's Chromium through its ChromeDriver.
BROWSER := /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: run cluster lint test test-versions soak faults fuzz bench sim sample clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,mcp,top,bench]'
	touch $(STAMP)

sample: $(STAMP)
	$(BIN)/python -m mesh.nodes.sample var

run: sample
	$(BIN)/mesh up topologies/quickstart.toml

# Three brokers in a cluster with the same nodes (docs/topologies.md, "Clusters").
cluster: sample
	$(BIN)/mesh up topologies/cluster.toml

$(BROWSER):
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; \
	else echo "no apt-get: install Chromium and ChromeDriver yourself, or the browser test is skipped"; fi

# The fault suite's partitions and packet loss are nftables rules inside network namespaces.
NFT := /usr/sbin/nft
$(NFT):
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nftables iproute2; \
	else echo "no apt-get: install nftables yourself, or the fault tests are skipped"; fi

# The MCP bridge is also driven by the official TypeScript SDK's client, run with node.
MCP_CLIENT := tests/mcp-client/node_modules/.package-lock.json
$(MCP_CLIENT): tests/mcp-client/package-lock.json
	@if command -v npm >/dev/null; then npm ci --prefix tests/mcp-client --no-audit --no-fund --silent; \
	else echo "no npm: install Node.js, or the TypeScript MCP client test is skipped"; fi

# Seconds, so first: ruff's rules and mypy's types as pyproject.toml sets them (README, "Checks").
lint: $(STAMP)
	$(BIN)/ruff check mesh tests
	$(BIN)/mypy

# The suite on two pytest-xdist workers, each taking a whole test file at a time (its module
# fixtures run once, and a file's tests never run beside each other); most of its time is
# spent waiting on processes and sockets, so two workers halve it on a 2-core machine.
# `make test XDIST=` runs it in one process.
XDIST ?= -n 2 --dist loadfile
test: lint $(BROWSER) $(NFT) $(MCP_CLIENT)
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -m "not slow" $(XDIST)

# The suite on every CPython the classifiers name, each in its own venv (.venv-pythonX.Y):
# the oldest supported and the newest the machine offers (pyenv's shims here).
PYTHONS ?= python3.11 python3.13
test-versions: $(BROWSER) $(NFT) $(MCP_CLIENT)
	@export PYENV_VERSION="$$(pyenv versions --bare 2>/dev/null | tr '\n' ':' | sed 's/:$$//')"; \
	for py in $(PYTHONS); do \
		echo "== $$py"; \
		$$py -m venv .venv-$$py && .venv-$$py/bin/pip install --quiet -e '.[test,mcp,top,bench]' && \
		.venv-$$py/bin/lint-imports --no-cache && .venv-$$py/bin/pytest -m "not slow" $(XDIST) || exit 1; \
	done

soak: $(STAMP)
	$(BIN)/pytest -m slow

# The fault suite (docs/operations.md, "Fault suite"): topologies/faults.toml over network
# namespaces (root; iproute2 and nftables), FAULT_ROUNDS rounds of each nemesis from
# FAULT_SEED, the checker's figures per nemesis printed and written to FAULT_JSON.
FAULT_SEED ?= 1
FAULT_ROUNDS ?= 10
FAULT_JSON ?= faults.json
faults: $(STAMP) $(NFT)
	$(BIN)/python -m mesh.faults --seed $(FAULT_SEED) --rounds $(FAULT_ROUNDS) --json $(FAULT_JSON)

# The fuzz suite (docs/fuzzing.md): the property-based fuzzers with FUZZ_EXAMPLES seeds each,
# then FUZZ_SECONDS of attack on every port of a real `mesh up` from seed FUZZ_SEED.
FUZZ_SECONDS ?= 600
FUZZ_SEED ?= 1
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	status=0; \
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -p no:cacheprovider -o timeout=0 tests/unit/test_fuzz_*.py || status=1; \
	$(BIN)/python -m mesh.fuzz --seed $(FUZZ_SEED) --duration $(FUZZ_SECONDS) || status=1; \
	exit $$status

bench: $(STAMP)
	$(BIN)/mesh bench --clients 4 --inflight 32 --payload 256

# The consensus core under 20 000 seeded fault schedules (docs/cluster-core.md).
sim: $(STAMP)
	$(BIN)/python -m mesh.cluster.sim --seeds 20000

clean:
	rm -rf $(VENV) var .mesh build *.egg-info
