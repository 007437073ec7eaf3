# Two commands do everything on a fresh machine:
#   make serve   set up, register the committed models, start the service on :3000
#   make test    set up and run the test suite
# The virtual environment is rebuilt whenever pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PORT ?= 3000

# Tools whose pins conflict with the service's, each in its own virtual environment,
# rebuilt whenever its requirements file changes: the KServe SDK (deploy checks, v2
# clients) and MLServer (a benchmark peer).
KSERVE_VENV ?= .venv-kserve
KSERVE_INSTALLED := $(KSERVE_VENV)/.installed
MLSERVER_VENV ?= .venv-mlserver
MLSERVER_INSTALLED := $(MLSERVER_VENV)/.installed

CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

.PHONY: setup test browser prometheus serve register lint format bench bench-gpu bench-peers \
	bench-soak clean container container-test kserve-venv mlserver-venv

setup: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The tests that use the tool environments fail, rather than skip, when make names them.
test: $(INSTALLED) $(KSERVE_INSTALLED) $(MLSERVER_INSTALLED) browser prometheus
	KSERVE_VENV=$(KSERVE_VENV) MLSERVER_VENV=$(MLSERVER_VENV) $(BIN)/pytest

kserve-venv: $(KSERVE_INSTALLED)

$(KSERVE_INSTALLED): deploy/kserve-requirements.txt
	$(PYTHON) -m venv --clear $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet --upgrade "pip>=24"
	$(KSERVE_VENV)/bin/pip install --quiet -r $<
	touch $@

mlserver-venv: $(MLSERVER_INSTALLED)

$(MLSERVER_INSTALLED): bench/peers/mlserver-requirements.txt
	$(PYTHON) -m venv --clear $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet --upgrade "pip>=24"
	$(MLSERVER_VENV)/bin/pip install --quiet -r $<
	touch $@

# Debian's Chromium and its driver, for the web page's browser tests
# (tests/test_ui_browser.py). Installing needs root; without it the browser
# tests skip and say so.
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "Chromium is missing and installing it needs root" \
			"(apt-get install chromium chromium-driver): the browser tests will skip."; \
	fi

# Debian's Prometheus (the server and promtool), for the dashboard and rule tests
# (tests/test_observability.py). Installing needs root; without it those tests skip
# and say so. The package's own service is kept from starting while it installs
# (a policy-rc.d that refuses, unless the machine already has one).
prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		policy=/usr/sbin/policy-rc.d; made=; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy && chmod +x $$policy && made=1; fi; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
		status=$$?; [ -z "$$made" ] || rm -f $$policy; exit $$status; \
	else \
		echo "Prometheus is missing and installing it needs root" \
			"(apt-get install prometheus): the Prometheus tests will skip."; \
	fi

serve: $(INSTALLED)
	$(BIN)/python -m training.register
	$(BIN)/bentoml serve service.service:ServingService --port $(PORT)

register: $(INSTALLED)
	$(BIN)/python -m training.register

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# CPU comparisons (batching, backends, workers, threads); results in bench-results/cpu/.
bench: $(INSTALLED)
	$(BIN)/python -m bench.run --set cpu $(BENCH_ARGS)

# The service against its peers (LitServe, MLServer, BentoML's batchable API, bare
# Starlette) and against itself before the lean request path, with the targets;
# bench-results/peers/.
bench-peers: $(INSTALLED) $(MLSERVER_INSTALLED)
	MLSERVER_VENV=$(MLSERVER_VENV) $(BIN)/python -m bench.run --set peers $(BENCH_ARGS)

# Memory under steady load: a mixed load, then each endpoint alone, 30 minutes each
# (about 2 h 10 min); worker RSS against requests served, in bench-results/soak/.
bench-soak: $(INSTALLED)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# GPU comparisons and the throughput/latency targets (needs CUDA).
bench-gpu: $(INSTALLED)
	$(BIN)/python -m bench.run --set gpu $(BENCH_ARGS)

# Container images (docs/deploy.md). VARIANT=gpu: PyTorch with its CUDA wheels, for
# GPU nodes and the CPU alike; VARIANT=cpu: ONNX Runtime only, no torch. The base is
# python:3.11-slim where it can be pulled, else one made from Debian's packages
# (needs root, buildah, podman and debootstrap).
IMAGE ?= digit-sentiment-serving
VARIANT ?= gpu

container: $(INSTALLED)
	$(BIN)/python -m training.register
	IMAGE=$(IMAGE) BENTOML=$(BIN)/bentoml deploy/container/build.sh $(VARIANT)

# Starts the image built by `make container` and checks it over HTTP (several minutes).
container-test: $(INSTALLED)
	CONTAINER_IMAGE=localhost/$(IMAGE):$(VARIANT) $(BIN)/pytest -m container -rP tests/test_container.py

clean:
	rm -rf $(VENV) $(KSERVE_VENV) $(MLSERVER_VENV) build *.egg-info .pytest_cache .ruff_cache
