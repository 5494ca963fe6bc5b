# Multiverse: the two commands a new user needs are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DATA_DIR ?= $(HOME)/.local/share/multiverse

.PHONY: run stop test lint proto venv deps test-deps ui clean bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Bytecode for our own modules, as pip's install of a wheel writes it: an editable install
# leaves it to the first import, which never writes it where PYTHONDONTWRITEBYTECODE is set
# (as on our CI machines), and every CLI call then compiled the client again (~20 ms).
# Unchanged modules are skipped.
venv: $(VENV)/.installed
	@$(PY) -m compileall -q src >/dev/null

# Host packages the real-VM driver and its test guest need (Debian); skipped when present.
deps:
	@bash scripts/host-deps.sh

# The dashboard's front-end modules, from npm with the lockfile (web/); copied into the Python
# package, which then needs no Node.js. axe-core (tests only) stays in web/node_modules.
UI_BUILT := src/multiverse/master/ui/static/vendor/xterm.js
web/node_modules/.package-lock.json: web/package-lock.json
	@command -v npm >/dev/null || bash scripts/host-deps.sh nodejs npm
	cd web && npm ci --no-audit --no-fund --loglevel=error

$(UI_BUILT): web/node_modules/.package-lock.json web/build.mjs
	cd web && node build.mjs

ui: $(UI_BUILT)

# What only the tests need: the browser the dashboard's tests drive, the SSH server `node add`'s
# tests install a worker through.
test-deps:
	@bash scripts/host-deps.sh chromium openssh-server

run: venv deps ui
	DATA_DIR=$(DATA_DIR) bash scripts/quickstart.sh

stop: venv
	$(VENV)/bin/multiverse down --data-dir $(DATA_DIR)

# Tests share the built guest images, cached in .data/images (not in git).
test: venv deps test-deps ui
	$(VENV)/bin/multiverse image build tiny --no-import --images-dir $(CURDIR)/.data/images
	$(VENV)/bin/multiverse image build debian --no-import --images-dir $(CURDIR)/.data/images
	MULTIVERSE_IMAGE_CACHE=$(CURDIR)/.data/images $(PY) -m pytest -q --durations=20

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Figures, printed; not tests (see bench/README.md).
bench: venv deps
	$(VENV)/bin/multiverse image build tiny --no-import --images-dir $(CURDIR)/.data/images
	MULTIVERSE_IMAGE_CACHE=$(CURDIR)/.data/images $(PY) bench/boot.py
	MULTIVERSE_IMAGE_CACHE=$(CURDIR)/.data/images $(PY) bench/shell.py
	MULTIVERSE_IMAGE_CACHE=$(CURDIR)/.data/images $(PY) bench/exec.py
	MULTIVERSE_IMAGE_CACHE=$(CURDIR)/.data/images $(PY) bench/migrate.py
	$(PY) bench/images.py

# Regenerates src/multiverse/wire/v1/*_pb2*.py from proto/; tests check it is fresh.
proto: venv
	$(PY) -m multiverse.wire.generate

clean:
	rm -rf $(VENV) .data build dist src/*.egg-info web/node_modules src/multiverse/master/ui/static/vendor
