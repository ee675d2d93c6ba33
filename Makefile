# compute-api: `make run` serves on http://127.0.0.1:8000, `make test` runs every test.
# Both set up a virtualenv in .venv from the pinned lock files first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
export PATH := $(CURDIR)/.tools/bin:$(PATH)

RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed

.PHONY: help venv dev run test unit readme test-tools lint load bench soak e2e image image-loadtest kustomize-base kind-up lock clean

help:
	@echo "make run      serve the API with an embedded Dask cluster on http://$(HOST):$(PORT)"
	@echo "make test     install test tools, then run the whole test suite"
	@echo "make unit     the fast layer only: pure logic and in-process Dask, in seconds"
	@echo "make load     Locust swarm with SLO gate against LOAD_HOST (default: make run's server)"
	@echo "make bench    benchmark compute-api against the usual ways of serving compute, then its capacity"
	@echo "make soak     10-minute mixed load; prints error rate, p99 drift, RSS slope"
	@echo "make e2e      the chart's pods as real containers behind an nginx ingress"
	@echo "make image    build the container image with podman"
	@echo "make lint     ruff, shellcheck, helm lint --strict"
	@echo "make kind-up  local kind cluster with ingress-nginx, the operator and the chart (needs Docker + kind)"
	@echo "make lock     re-resolve requirements*.lock from pyproject.toml"

$(RUNTIME): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(DEV): $(RUNTIME) requirements-dev.lock
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	touch $@

venv: $(RUNTIME)
dev: $(DEV)

run: $(RUNTIME)
	$(BIN)/compute-api serve --host $(HOST) --port $(PORT)

# The README's configuration table, rendered from service/config.py.
readme: $(RUNTIME)
	$(BIN)/python scripts/render_readme.py

# System tools the tests drive for real (podman, nginx, helm, shellcheck...).
test-tools:
	scripts/install-test-tools.sh

test: $(DEV) test-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# No subprocesses, no containers: the in-flight core, the cost model, the Dask adapter in-process.
unit: $(DEV)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(DEV) test-tools
	$(BIN)/ruff check service tests bench locustfiles
	shellcheck scripts/*.sh .ci/run
	helm lint --strict helm/compute-api
	for f in helm/compute-api/ci/*.yaml; do helm lint --strict helm/compute-api --values $$f || exit 1; done

# Load test a running service (`make run` in another shell, or LOAD_HOST=https://your-ingress).
# Reports: results/locust/. Extra Locust options: LOAD_ARGS="-u 50 -t 5m --shape step".
LOAD_HOST ?= http://$(HOST):$(PORT)
load: $(DEV)
	$(BIN)/locust --config locustfiles/locust.conf --headless --host $(LOAD_HOST) $(LOAD_ARGS)

# The comparison, then the capacity scenario (CPU per request of each process); the comparison's
# exit status is kept.
bench: $(DEV)
	$(BIN)/python -m bench; status=$$?; $(BIN)/python -m bench capacity && exit $$status

soak: $(DEV)
	$(BIN)/python -m tests.soak --duration 600

e2e: $(DEV) test-tools
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

image: test-tools
	scripts/build-image.sh

# The same image plus locust, for in-cluster swarms (k8s/locust).
image-loadtest: test-tools
	LOADTEST=1 scripts/build-image.sh

# k8s/base is generated from the chart: edit the chart, then run this.
kustomize-base: test-tools
	scripts/render-kustomize-base.sh

kind-up:
	scripts/kind-up.sh

lock:
	$(PYTHON) -m venv /tmp/compute-api-lock && /tmp/compute-api-lock/bin/pip install --quiet uv
	/tmp/compute-api-lock/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes -o requirements.lock
	/tmp/compute-api-lock/bin/uv pip compile pyproject.toml --extra loadtest --universal --python-version 3.11 --generate-hashes -o requirements-loadtest.lock
	/tmp/compute-api-lock/bin/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 --generate-hashes -o requirements-dev.lock

clean:
	rm -rf $(VENV) .tools results .pytest_cache *.egg-info
