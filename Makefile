# perfcourse: `make lab` sets everything up and opens the course; `make test` runs every test.
# `make` alone lists the targets.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SCALE  ?= small
# Jupyter listens on loopback only, with its token. For a workshop server: make lab LAB_IP=0.0.0.0
LAB_IP   ?= 127.0.0.1
LAB_PORT ?= 8888
START    := notebooks/00-setup-and-dataset.ipynb
# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
NBVAL    := --nbval-current-env --nbval-cell-timeout=300 --nbval-sanitize-with src/perfcourse/grading/sanitize.cfg -p no:cacheprovider
# The servers this machine and CI run, for the "configured backends" pass.
CONFIGURED_DATABASE_URL ?= postgresql://127.0.0.1:5432/test
CONFIGURED_REDIS_URL    ?= redis://127.0.0.1:6379/0
# `make hub`: the shared install the JupyterHub test's learners run (any account may execute it).
HUB_PYTHON ?= /usr/bin/python3
HUB_VENV   ?= /tmp/perfcourse-hub/venv

.DEFAULT_GOAL := help
.PHONY: help setup lab lint test test-quick test-package e2e test-notebooks test-grading test-configured binder hub bench \
        assign outputs grade doctor services-down clean lock

help: ## list the targets
	@echo "perfcourse - make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24

$(STAMP): pyproject.toml requirements.lock binder/jupyterlab-overrides.json
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "perfcourse needs Python 3.11 or newer as '$(PYTHON)' (try: make lab PYTHON=python3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# JupyterLab without the "news" prompt (no network, nothing covering the first notebook)
	mkdir -p $(VENV)/share/jupyter/lab/settings
	cp binder/jupyterlab-overrides.json $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $@

setup: $(STAMP) ## create .venv (when missing or stale), install pinned packages, seed the dataset
	$(BIN)/perfcourse seed --scale $(SCALE)

lab: setup ## set up, then open the course in JupyterLab (token auth, 127.0.0.1)
	$(BIN)/jupyter lab --ServerApp.ip=$(LAB_IP) --ServerApp.port=$(LAB_PORT) \
		--ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/$(START) $(ROOT_FLAG)

lint: $(STAMP) ## style (ruff over the package, tests and notebooks) and the package's floors (import-linter)
	$(BIN)/ruff check src tests solutions notebooks labs
	$(BIN)/lint-imports --no-cache

test: setup ## set up, then lint and the whole suite (about 11 minutes on 2 cores)
	@# Lint beside the package tests (which keep to namespaces of their own), then the notebooks
	@# in three lanes, then the browser test alone (its widget waits are the first to starve).
	$(MAKE) --no-print-directory -j2 --output-sync=target lint test-package
	$(MAKE) --no-print-directory test-notebooks
	$(MAKE) --no-print-directory e2e
	@echo "make test: all suites passed"

test-quick: $(STAMP) ## maintainers' quick tier: fast package tests on SQLite and chapter 00's master (~1.5 min)
	$(BIN)/python -m pytest tests -q -m "not slow" -k "not postgres and not configured and not embedded" \
		--ignore=tests/grading --ignore=tests/binder --ignore=tests/hub --ignore=tests/e2e
	$(BIN)/python -m pytest --nbval $(NBVAL) solutions/00-setup-and-dataset.ipynb -q

test-package: $(STAMP) ## package tests (both backends, embedded and configured servers), on 4 workers
	@# 4 workers on 2 cores: most tests wait on servers, workers and sockets. The tests of a
	@# chapter with shared state stay on one worker (tests/conftest.py: SHARED_CHAPTERS).
	$(BIN)/python -m pytest tests -q -n 4 --ignore=tests/e2e --ignore=tests/binder --ignore=tests/hub

e2e: $(STAMP) ## JupyterLab in a real browser (Debian's chromium): Run All, figures, widgets, checks
	$(BIN)/python -m pytest tests/e2e -q

# The notebooks run in three lanes side by side, each lane a chapter's notebooks after another:
# lanes never share a chapter (a chapter's notebooks share its Redis keys, queues and files).
# Balanced by measured run time; most cells wait on servers, so three lanes fit on two cores.
LANE_1 ?= 06 07
LANE_2 ?= 04 08 02 10
LANE_3 ?= 03 05 09 01 00
lane_files = $(foreach c,$(LANE_$(1)),$(wildcard $(2)/$(c)-*.ipynb))

test-notebooks: $(STAMP) ## every master under strict nbval, every untouched learner version 0/N (3 lanes)
	$(BIN)/perfcourse assign --check
	@# Both datasets loaded before the run, so no progress bar shows up in a compared output.
	$(BIN)/perfcourse seed --scale $(SCALE) --backend sqlite --backend postgres
	$(MAKE) --no-print-directory -j3 --output-sync=target notebook-lane-1 notebook-lane-2 notebook-lane-3

notebook-lane-%: $(STAMP)
	@echo "lane $*: chapters $(LANE_$*)"
	$(BIN)/python -m pytest --nbval $(NBVAL) $(call lane_files,$*,solutions) -q
	@# Masters scoring N/N needs no second run: strict nbval compares every check's output with
	@# the stored one, and tests/test_run_all.py proves each is stored as right.
	$(BIN)/perfcourse grade --expect-untouched $(call lane_files,$*,notebooks) $(call lane_files,$*,labs)

test-grading: $(STAMP) ## untouched learner notebooks score 0/N while every other cell passes (one lane)
	$(BIN)/perfcourse grade --expect-untouched notebooks labs

test-configured: $(STAMP) ## notebooks again against the configured PostgreSQL and Redis servers
	DATABASE_URL=$(CONFIGURED_DATABASE_URL) REDIS_URL=$(CONFIGURED_REDIS_URL) \
		$(BIN)/perfcourse seed --scale $(SCALE) --backend postgres
	DATABASE_URL=$(CONFIGURED_DATABASE_URL) REDIS_URL=$(CONFIGURED_REDIS_URL) \
		$(BIN)/python -m pytest --nbval-lax $(NBVAL) solutions -q
	@# Leave the configured server as we found it.
	DATABASE_URL=$(CONFIGURED_DATABASE_URL) $(BIN)/perfcourse drop --scale $(SCALE) --backend postgres

binder: $(STAMP) ## replay Binder: a fresh env from binder/, then chapters 00, 02, 05 under 1 GB (CI)
	$(BIN)/python -m pytest tests/binder -q -s

hub: $(STAMP) ## a class on one server: JupyterHub, three local learners run 00 and 02 at once (root; CI)
	@# The shared install a workshop server has: a venv every account may run, outside this
	@# checkout (which may sit in a folder other accounts cannot enter), made with the system
	@# Python (not one under /root), holding the course's pins, JupyterHub and the package itself.
	mkdir -p -m 755 $(dir $(HUB_VENV))
	test -x $(HUB_VENV)/bin/python || $(HUB_PYTHON) -m venv $(HUB_VENV)
	$(HUB_VENV)/bin/python -m pip install --quiet -r requirements.lock -r requirements-hub.lock
	$(HUB_VENV)/bin/python -m pip install --quiet --no-deps --force-reinstall .
	test -x data/hub/node_modules/.bin/configurable-http-proxy || \
		npm install --silent --no-fund --no-audit --prefix data/hub configurable-http-proxy@5.3.0
	HUB_VENV=$(HUB_VENV) $(BIN)/python -m pytest tests/hub -q -s

bench: setup ## budgets: seeding rate vs the raw driver path; each master's time and peak memory
	$(BIN)/perfcourse bench --scale $(SCALE) --notebooks

assign: $(STAMP) ## regenerate learner notebooks and labs from the masters in solutions/
	$(BIN)/perfcourse assign

outputs: setup ## re-execute the masters to refresh their committed outputs
	$(BIN)/perfcourse outputs

grade: $(STAMP) ## grade your notebooks (save them first): make grade [NB=labs/01-...ipynb]
	$(BIN)/perfcourse grade $(NB)

doctor: $(STAMP) ## check this machine: packages, backends, memory, disk
	$(BIN)/perfcourse doctor

services-down: $(STAMP) ## stop the embedded PostgreSQL and Redis
	$(BIN)/perfcourse services down

clean: ## stop embedded servers, delete generated data and the virtualenv
	-@test -x $(BIN)/perfcourse && $(BIN)/perfcourse services down
	find data -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	rm -rf $(VENV)

lock: ## re-pin requirements.lock from pyproject.toml (maintainers)
	rm -rf /tmp/perfcourse-lock && $(PYTHON) -m venv /tmp/perfcourse-lock
	@# soupsieve 3+ needs Python 3.11.5+; Debian 12 (a common workshop server) has 3.11.2.
	/tmp/perfcourse-lock/bin/pip install --quiet ".[lab,dev]" "soupsieve<3"
	/tmp/perfcourse-lock/bin/pip freeze --exclude perfcourse > requirements.lock
