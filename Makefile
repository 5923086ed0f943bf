# Flotilla. Newcomers need two targets: `make run` and `make test`.
# Each target sets up what is missing first; the rest are building blocks.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUILD_VENV := .venv-build
MODEL_ARTIFACTS := build/models
MODEL_ONNX := $(MODEL_ARTIFACTS)/.done
SAMPLES := build/samples

.PHONY: install prometheus models samples generate docs run up test fuzz bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,test,loadtest]'
	touch $@

# Debian's Prometheus server and promtool: `flotilla up --prometheus` and the
# alert-rule tests. Installed with apt-get (as root) only when missing.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }

# torch lives only in this build venv: it exports the model once.
$(BUILD_VENV)/.installed: flotilla/modelbuild/requirements.txt flotilla/modelbuild/requirements-nodeps.txt
	$(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/pip install --quiet torch==2.13.0
	$(BUILD_VENV)/bin/pip install --quiet -r flotilla/modelbuild/requirements.txt
	$(BUILD_VENV)/bin/pip install --quiet --no-deps -r flotilla/modelbuild/requirements-nodeps.txt
	touch $@

models: $(MODEL_ONNX) $(SAMPLES)/.done

$(MODEL_ONNX): flotilla/modelbuild/export.py flotilla/modelbuild/catalog.py | $(BUILD_VENV)/.installed
	PYTHONPATH=. $(BUILD_VENV)/bin/python -m flotilla.modelbuild.export --out $(MODEL_ARTIFACTS)
	touch $@

samples: $(SAMPLES)/.done

$(SAMPLES)/.done: flotilla/modelbuild/samples.py | $(BUILD_VENV)/.installed
	PYTHONPATH=. $(BUILD_VENV)/bin/python -m flotilla.modelbuild.samples --out $(SAMPLES)
	touch $@

generate: install
	$(BIN)/python -m flotilla.api.generate

# The configuration reference, docs/configuration.md, from the settings classes (a test fails when it is stale).
docs: install
	$(BIN)/python -m flotilla.docs

run: install models
	$(BIN)/flotilla run --config flotilla.yaml

up: install models
	$(BIN)/flotilla up --config flotilla.yaml

test: install models prometheus
	$(BIN)/pytest

# The fuzz tests at length (random, 10 000 cases each, about seven minutes; docs/operations.md, "Fuzzing").
# `make test` runs them too, a few thousand cases in all.
fuzz: install samples
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest tests/fuzz

# The bench's peer (the same job on Ray Serve): an extra only `make bench` needs.
$(VENV)/.peer-installed: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[local,test,loadtest,peer]'
	touch $@

bench: install models $(VENV)/.peer-installed
	$(BIN)/flotilla bench

# mypy reads the package as it imports (see [tool.mypy] in pyproject.toml): flotilla/ with
# services/ and clients/ linked in.
TYPECHECK := build/typecheck

lint: install
	$(BIN)/ruff check flotilla services clients tests
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/flotilla
	ln -s $(CURDIR)/flotilla/* $(CURDIR)/services $(CURDIR)/clients $(TYPECHECK)/flotilla/
	$(BIN)/mypy

clean:
	rm -rf build .flotilla
