# The two commands a new user runs on a fresh machine:
#   make run    start the server with embedded defaults (SQLite, in-process bus, ./var)
#   make test   run the whole test suite
# Both set up what they need first (a virtualenv, hls.js from npm, Chromium for browser tests).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench setup browser clean

run: setup
	$(BIN)/livesrv serve $(ARGS)

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

setup: $(STAMP) web/node_modules/.package-lock.json

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "livesrv needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# hls.js and friends, from npm, pinned by the lock file
web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --loglevel=error

# Chromium for the Playwright tests: Debian's package (Playwright's own browser download is
# not used), installed once if missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "browser tests need Chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

bench: setup
	@echo "benchmarks live in bench/; see docs/BENCHMARKS.md for each command"

clean:
	rm -rf $(VENV) web/node_modules .pytest_cache
