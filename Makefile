# Two entry points: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, alone: everything after it sees torch installed and pip keeps that build.
# TORCH_SPEC can select another build (e.g. a CUDA wheel index via PIP_EXTRA_INDEX_URL) on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
# The stamp holds a checksum of what the install depends on (pyproject.toml, TORCH_SPEC), not a time: a fresh
# clone (every file new) or another checkout sharing this .venv reuses it while those are unchanged.
INSTALL_KEY := $(shell (cat pyproject.toml; echo '$(TORCH_SPEC)') | cksum | cut -d' ' -f1)
# Targets run this checkout's src/ even when the .venv's editable install points at another checkout.
RUN := PYTHONPATH=src HF_HUB_OFFLINE=1 $(BIN)/python

.PHONY: install reinstall demo demo-craft test test-compat bench clean

install:
	@test "$$(cat $(VENV)/.installed 2>/dev/null)" = "$(INSTALL_KEY)" || $(MAKE) --no-print-directory reinstall

reinstall:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# DeepSpeed builds against the installed torch: no build isolation, or pip would fetch another torch.
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install --quiet -e ".[all,test]"
	echo "$(INSTALL_KEY)" > $(VENV)/.installed

demo: install
	$(RUN) -m craft.demo

demo-craft: install
	$(RUN) -m craft.demo_craft

test: install
	$(RUN) -m pytest -q tests

# contrastive-ft 0.4.3's own test suite against this package (downloads its sdist; not part of `make test`).
test-compat: install
	$(RUN) compat/run_original_tests.py

bench: install
	$(RUN) bench/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
