# Two entry points: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, alone: everything after it sees torch installed and pip keeps that build.
# TORCH_SPEC can select another build (e.g. a CUDA wheel index via PIP_EXTRA_INDEX_URL) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo demo-craft test test-compat bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# DeepSpeed builds against the installed torch: no build isolation, or pip would fetch another torch.
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install --quiet -e ".[all,test]"
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m craft.demo

demo-craft: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m craft.demo_craft

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# contrastive-ft 0.4.3's own test suite against this package (downloads its sdist; not part of `make test`).
test-compat: install
	HF_HUB_OFFLINE=1 $(BIN)/python compat/run_original_tests.py

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
