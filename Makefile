# Two commands set up a fresh machine (Python 3.11 and the package registries):
#   make demo   - venv, install, run the main job (all-MiniLM-L6-v2 compiled with adaattn)
#   make test   - same venv plus test extras, the whole suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines install torch 2.13.0 (a local CPU wheel); the package itself accepts older
# torch (the GPU machine runs 2.11), so the pin lives here and not in pyproject.toml.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,demo,bench]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/adaattn demo

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV)
