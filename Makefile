# `make test` and `make bench` work on a fresh machine with only Python 3.10+: they create .venv and install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; a plain `pip install torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint bench demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/routing_cost.py

# The whole pipeline on the built-in digits (fetch base, VAE, latents, training, eval, report): 9-20 min on 2 CPU cores (README).
demo: install
	$(PY) -m megafusion demo --out outputs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
