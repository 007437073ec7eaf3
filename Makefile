# Two commands do everything on a fresh machine:
#   make serve   set up, register the committed models, start the service on :3000
#   make test    set up and run the test suite
#   make help    every target, with what it does
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
	bench-soak clean container container-test kserve-venv mlserver-venv docs

setup: $(INSTALLED) ## create .venv with the project and its dev tools (again when pyproject.toml changes)

$(INSTALLED): pyproject.toml
	@echo "installing the Python packages into $(VENV) (a few minutes the first time)..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# The tests that use the tool environments fail, rather than skip, when make names them.
# The docs site is built first: a broken link or a page missing from the nav fails it.
test: $(INSTALLED) $(KSERVE_INSTALLED) $(MLSERVER_INSTALLED) browser prometheus docs ## set up and run the whole test suite (about 10 minutes)
	@echo "running the tests (about 10 minutes; collecting them takes ~20 s)..."
	KSERVE_VENV=$(KSERVE_VENV) MLSERVER_VENV=$(MLSERVER_VENV) $(BIN)/pytest

kserve-venv: $(KSERVE_INSTALLED) ## the KServe SDK in .venv-kserve (deploy checks, v2 clients)

$(KSERVE_INSTALLED): deploy/kserve-requirements.txt
	@echo "installing the KServe SDK into $(KSERVE_VENV) (a minute or two the first time)..."
	$(PYTHON) -m venv --clear $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet --upgrade "pip>=24"
	$(KSERVE_VENV)/bin/pip install --quiet -r $<
	touch $@

mlserver-venv: $(MLSERVER_INSTALLED) ## MLServer in .venv-mlserver (a benchmark peer)

$(MLSERVER_INSTALLED): bench/peers/mlserver-requirements.txt
	@echo "installing MLServer into $(MLSERVER_VENV) (a minute or two the first time)..."
	$(PYTHON) -m venv --clear $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --quiet --upgrade "pip>=24"
	$(MLSERVER_VENV)/bin/pip install --quiet -r $<
	touch $@

# Debian's Chromium and its driver, for the web page's browser tests
# (tests/test_ui_browser.py). Installing needs root; without it the browser
# tests skip and say so.
browser: ## install Chromium and its driver for the browser tests (root; else they skip)
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Chromium for the browser tests (apt-get, a minute)..."; \
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
prometheus: ## install Prometheus and promtool for the observability tests (root; else they skip)
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		policy=/usr/sbin/policy-rc.d; made=; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' >$$policy && chmod +x $$policy && made=1; fi; \
		echo "installing Prometheus for the observability tests (apt-get, a minute)..."; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
		status=$$?; [ -z "$$made" ] || rm -f $$policy; exit $$status; \
	else \
		echo "Prometheus is missing and installing it needs root" \
			"(apt-get install prometheus): the Prometheus tests will skip."; \
	fi

serve: $(INSTALLED) ## set up, register the models, serve them on http://localhost:3000 (PORT=3001: another port)
	@$(BIN)/python -m service.preflight --port $(PORT)
	@echo "registering the models in the BentoML store..."
	$(BIN)/python -m training.register
	@echo "starting the service on http://localhost:$(PORT) (ready in about 10 s; Ctrl-C stops it)"
	$(BIN)/bentoml serve service.service:ServingService --port $(PORT)

register: $(INSTALLED) ## put the committed models in the BentoML store (python -m training.register)
	$(BIN)/python -m training.register

docs: $(INSTALLED) ## build the documentation site into site/ (mkdocs build --strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

lint: $(INSTALLED) ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(INSTALLED) ## ruff format and ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# CPU comparisons (batching, backends, workers, threads); results in bench-results/cpu/.
bench: $(INSTALLED) ## CPU benchmarks (batching, backends, workers, threads) into bench-results/cpu/
	$(BIN)/python -m bench.run --set cpu $(BENCH_ARGS)

# The service against its peers (LitServe, MLServer, BentoML's batchable API, bare
# Starlette) and against itself before the lean request path, with the targets;
# bench-results/peers/.
bench-peers: $(INSTALLED) $(MLSERVER_INSTALLED) ## the service against its peers (LitServe, MLServer, ...), into bench-results/peers/
	MLSERVER_VENV=$(MLSERVER_VENV) $(BIN)/python -m bench.run --set peers $(BENCH_ARGS)

# Memory under steady load: a mixed load, then each endpoint alone, 30 minutes each
# (about 2 h 10 min); worker RSS against requests served, in bench-results/soak/.
bench-soak: $(INSTALLED) ## memory under steady load, about 2 h 10 min, into bench-results/soak/
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# GPU comparisons and the throughput/latency targets (needs CUDA).
bench-gpu: $(INSTALLED) ## GPU benchmarks and the throughput/latency targets (needs CUDA)
	$(BIN)/python -m bench.run --set gpu $(BENCH_ARGS)

# Container images (docs/deploy.md). VARIANT=gpu: PyTorch with its CUDA wheels, for
# GPU nodes and the CPU alike; VARIANT=cpu: ONNX Runtime only, no torch. The base is
# python:3.11-slim where it can be pulled, else one made from Debian's packages
# (needs root, buildah, podman and debootstrap).
IMAGE ?= digit-sentiment-serving
VARIANT ?= gpu
CONTAINER_TOOLS ?= buildah podman debootstrap

# $(call container_tools,WITHOUT,THEN): the tools the container scripts run, installed
# from Debian's packages where missing (needs root and apt-get); else one line saying
# what to install and WITHOUT (what happens), then the shell command THEN.
define container_tools
@missing=; for tool in $(CONTAINER_TOOLS); do \
	command -v $$tool >/dev/null || missing="$$missing $$tool"; \
done; \
if [ -z "$$missing" ]; then \
	true; \
elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	echo "installing$$missing for the container images (apt-get, a minute)..."; \
	apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; \
else \
	echo "not installed:$$missing; installing them needs root (apt-get install$$missing): $(1)." >&2; \
	$(2); \
fi
endef

.PHONY: help container-tools

container-tools: ## install buildah, podman and debootstrap (root and apt-get)
	$(call container_tools,make container-tools stops here,exit 1)

container: $(INSTALLED) ## build the service's image, localhost/digit-sentiment-serving:gpu (VARIANT=cpu: no torch)
	$(call container_tools,make container stops here,exit 1)
	@echo "registering the models in the BentoML store..."
	$(BIN)/python -m training.register
	IMAGE=$(IMAGE) BENTOML=$(BIN)/bentoml deploy/container/build.sh $(VARIANT)

# Starts the image built by `make container` and checks it over HTTP (several minutes).
container-test: $(INSTALLED) ## start the image make container built and check it over HTTP (several minutes)
	$(call container_tools,the container tests will skip,true)
	CONTAINER_IMAGE=localhost/$(IMAGE):$(VARIANT) $(BIN)/pytest -m container -rP tests/test_container.py

clean: ## remove the virtual environments and build outputs
	rm -rf $(VENV) $(KSERVE_VENV) $(MLSERVER_VENV) build site *.egg-info .pytest_cache .ruff_cache

# Every target with the first line of its help: the `## ` comment on its rule line, or
# the first `## ` line of the comments just above it.
help: ## list every target with what it does
	@echo "make TARGET [PORT=$(PORT)] [VARIANT=$(VARIANT)] [BENCH_ARGS=...]; the targets:"
	@awk '/^## / { if (help == "") help = substr($$0, 4); next } \
		/^[A-Za-z0-9][A-Za-z0-9_.-]*( +[A-Za-z0-9][A-Za-z0-9_.-]*)* *:([^=:]|$$)/ { \
			at = index($$0, " ## "); if (at) help = substr($$0, at + 4); \
			split($$0, rule, ":"); n = split(rule[1], names, " "); \
			for (i = 1; i <= n; i++) printf "  %-16s %s\n", names[i], help; \
		} \
		!/^#/ { help = "" }' $(firstword $(MAKEFILE_LIST))
