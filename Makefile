# Each target sets itself up on a fresh machine: a virtual environment, torch pinned first
# (the CPU build on this machine's disk; any other pin downloads a multi-GB CUDA build),
# then normlab with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.normlab-installed
TORCH_PIN := torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: test demo docs lint bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/normlab demo

# The README's demo table and docs/lab/demo_accuracy.png, regenerated from `normlab demo`
# (seed 0): the numbers there cannot drift from what the code gives. With LAB=DIR, also
# the experiments' blocks in docs/lab.md and docs/lab-more.md and their PNGs, rebuilt from
# the stored runs in DIR/<name>/results.json (nothing retrains; a missing run is refused).
LAB ?=
docs: $(STAMP)
	$(PY) -m normlab.experiments.docs
	$(if $(LAB),$(PY) -m normlab.experiments.docs --lab $(LAB))

lint: $(STAMP)
	$(VENV)/bin/ruff check normlab tests benchmarks examples

bench: $(STAMP)
	$(VENV)/bin/normlab bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs
