# Everything the project needs is installed from here; a fresh clone needs only Python 3.11.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean sysdeps deploy-check

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exact: it resolves to the CPU build on disk instead of a CUDA download.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

# docker-compose parses the compose file in a test; wrk drives the load benchmark; chromium (and its
# driver) is the browser the dashboard test drives. Debian packages as package:command, installed only
# when the command is missing and when we may (root with apt-get); otherwise those checks say so.
SYSPKGS := docker-compose:docker-compose wrk:wrk chromium:chromium chromium-driver:chromedriver
sysdeps:
	@missing=""; for pc in $(SYSPKGS); do command -v $${pc#*:} >/dev/null || missing="$$missing $${pc%%:*}"; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	fi

# DEMO_ARGS=--download: ignore ../shared/data and fetch ml-100k as a fresh clone would.
demo: $(STAMP)
	$(BIN)/python -m app.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) sysdeps lint
	$(BIN)/python -m pytest -q

# The docker deployment really built and run here: a docker engine, images from Debian's packages, the
# compose stack on ports of its own, the end-to-end flow against the containers, then all torn down.
# Root, several minutes; not part of `make test` (docs/results/deploy-check.md).
deploy-check: $(STAMP)
	bash deploy/check.sh

clean:
	rm -rf $(VENV) .pytest_cache
