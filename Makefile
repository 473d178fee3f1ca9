# Entry points a new user needs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONPATH := operator:trainer-image

.PHONY: setup demo test test-fast lint typecheck unit crds docs clean e2e-cluster e2e-cluster-kubeconfig

$(VENV)/.installed: pyproject.toml tests/requirements-s3.txt trainer-image/requirements-s3.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the CPU wheel; a plain range would pull a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[trainer,dev,local]"
	# boto3 and the S3 test server: apart, without dependency resolution (see the file).
	$(PY) -m pip install --quiet --no-deps -r tests/requirements-s3.txt
	touch $@

setup: $(VENV)/.installed

# The whole product on this machine: embedded API, operator, trainer, vLLM reference server.
# DEMO_ARGS="--workdir demo-output --keep" keeps the volumes, pods and adapter for a look.
demo: setup
	$(PY) -m finetune_operator.tools.validate examples/quickstart/*.yaml examples/production/*.yaml examples/serving/*.yaml
	$(PY) -m finetune_local demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# Test modules spread over worker processes (pytest-xdist); a module stays on one worker, so
# its module-scoped fixtures (a training run, an S3 server) are built once. Four workers on two
# cores: most operator tests wait on the operator, not on a CPU (decision 1940).
# PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 4
PYTEST_PARALLEL := -n $(PYTEST_WORKERS) --dist loadfile

unit: setup
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL)

test: lint typecheck unit

# The unit and controller tests only: without the tests that train a model, run the product
# end to end or render for long (markers `slow` and `e2e`, pyproject.toml).
test-fast: setup
	$(VENV)/bin/pytest -q $(PYTEST_PARALLEL) -m "not slow and not e2e"

# The FineTuneJob lifecycle tests against the cluster KUBECONFIG names (docs/development.md):
# CRDs and RBAC from the chart, the operator in this process as the chart's ServiceAccount.
e2e-cluster: e2e-cluster-kubeconfig setup
	FINETUNE_E2E_CLUSTER=1 $(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e_cluster

# Checked before anything is set up, so that a missing KUBECONFIG is the first thing said.
e2e-cluster-kubeconfig:
	@if [ -z "$$KUBECONFIG" ]; then \
	  echo "make e2e-cluster needs KUBECONFIG: set it to the kubeconfig of the cluster to test" \
	    "(a user who may install CRDs and RBAC and create namespaces); see docs/development.md" >&2; \
	  exit 2; \
	fi

crds: setup
	$(PY) -m finetune_operator.tools.crdgen crds
	$(PY) -m finetune_operator.tools.apidoc > docs/api.md
	$(PY) scripts/render_deploy.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
