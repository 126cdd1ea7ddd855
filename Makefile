# The README's commands. Each target installs what it needs into .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# On the CPU build machine this pin resolves to a local wheel; set TORCH_SPEC to change it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup kernels demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,data]"
	touch $(STAMP)

# The native CPU kernels, built once ahead of first use (about a minute; cached in
# $$TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Without a C++ compiler it
# fails and everything runs on PyTorch ops: ignored here.
kernels: setup
	-$(BIN)/reformer build-kernels

demo: kernels
	$(BIN)/reformer demo --max-minutes 3

test: kernels
	$(BIN)/python -m pytest

# Benchmarks (issue 3): the anchors (HF transformers, reformer-pytorch) live in their own venv.
ANCHORS := benchmarks/.venv-anchors
BENCH_NAME ?= full
$(ANCHORS)/.installed: benchmarks/requirements-anchors.txt benchmarks/setup_anchors.sh pyproject.toml
	bash benchmarks/setup_anchors.sh

bench: $(ANCHORS)/.installed
	$(ANCHORS)/bin/python benchmarks/run_all.py --name $(BENCH_NAME) $(BENCH_ARGS)
	$(ANCHORS)/bin/python benchmarks/report.py benchmarks/results/$(BENCH_NAME).jsonl

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
