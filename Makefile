# One entry point for people and CI. Each target builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DIST ?= dist

.PHONY: test lint deploy-check test-tools demo sandbox bench dist clean lock image image-base image-tools

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

# Programs the tests start themselves: tinyproxy, the real forward proxy of tests/test_egress_proxy.py.
# Installed with apt-get when missing and we are root -- the binary only (tinyproxy-bin: no service
# is set up or started); otherwise those tests are skipped, and pytest's summary says so.
test-tools:
	@command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends tinyproxy-bin >/dev/null; \
	else \
		echo "tinyproxy is missing and this is not root with apt-get: the forward-proxy tests will be skipped"; \
	fi

test: lint deploy-check test-tools
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/ksz-proxy sandbox --demo

sandbox: $(STAMP)
	$(BIN)/ksz-proxy sandbox

# Benchmark against nginx and a bare aiohttp proxy on loopback (bench/README.md); about 10
# minutes, `make bench BENCH_ARGS=--quick` about 2. Not part of `make test`.
bench: $(STAMP)
	VENV=$(VENV) bash bench/run.sh $(BENCH_ARGS)

# A wheel and an sdist in dist/, to install on a server (README, Install):
#   pipx install dist/ksz_proxy-<version>-py3-none-any.whl
dist: $(STAMP)
	rm -rf $(DIST)
	$(BIN)/python -m build --outdir $(DIST) .

# The hashed lock files the image installs with --require-hashes: the runtime dependencies from
# pyproject.toml, and the build backend pinned in its [build-system]. Resolved for the image's
# Python (3.13, Linux) whatever Python runs this; every wheel's hash is kept, for any machine.
LOCK_FLAGS = --generate-hashes --python-version 3.13 --python-platform linux \
	--custom-compile-command 'make lock' --quiet
lock: $(STAMP)
	$(BIN)/uv pip compile $(LOCK_FLAGS) --upgrade pyproject.toml -o requirements.lock
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(BIN)/uv pip compile $(LOCK_FLAGS) --upgrade - -o requirements-build.lock

# The container image with buildah (docs/container.md): ksz-proxy:<version> in the local
# container storage and its CycloneDX SBOM in dist/. Installs buildah/podman/runc/debootstrap
# from Debian when missing (as root). IMAGE_ARGS: more `buildah bud` options, e.g.
# IMAGE_ARGS='--build-arg BASE_IMAGE=python:3.13-slim-trixie@sha256:...'.
image-tools:
	bash deploy/image/tools.sh

image: $(STAMP) image-tools
	VENV=$(VENV) bash deploy/image/build.sh $(IMAGE_ARGS)

# Where Docker Hub is out of reach: a stand-in for the Dockerfile's base image, from debootstrap.
image-base: image-tools
	bash deploy/image/base.sh

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache .mypy_cache .ruff_cache .hypothesis
