# One entry point for people and CI. Each target builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIST ?= dist

.PHONY: test lint deploy-check demo sandbox bench dist clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ksz-proxy needs Python >= 3.11 (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy --strict proxy tests

# Dockerfile, manifests, rules, unit (deploy/check.sh); the Python side is tests/test_deploy.py.
deploy-check: $(STAMP)
	VENV=$(VENV) bash deploy/check.sh

test: lint deploy-check
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/ksz-proxy sandbox --demo

sandbox: $(STAMP)
	$(BIN)/ksz-proxy sandbox

# Benchmark against nginx and a bare aiohttp proxy on loopback (bench/README.md); about 9
# minutes, `make bench BENCH_ARGS=--quick` about 2. Not part of `make test`.
bench: $(STAMP)
	VENV=$(VENV) bash bench/run.sh $(BENCH_ARGS)

# A wheel and an sdist in dist/, to install on a server (README, Install):
#   pipx install dist/ksz_proxy-<version>-py3-none-any.whl
dist: $(STAMP)
	rm -rf $(DIST)
	$(BIN)/python -m build --outdir $(DIST) .

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache .mypy_cache .ruff_cache .hypothesis
