# Two commands do all set-up on a fresh machine (see README.md):
#   make run    the main job with embedded defaults (writes results/)
#   make test   every test: pytest and the notebooks under nbval
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# CPU torch first: a plain `pip install torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m m3lab run

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests $(wildcard notebooks/*.ipynb) --nbval-lax --durations=10

clean:
	rm -rf $(VENV) results runs
