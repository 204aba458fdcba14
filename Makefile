# Two commands do all set-up on a fresh machine (see README.md):
#   make run    the main job with embedded defaults (writes results/)
#   make test   every test: pytest and the notebooks under nbval
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test setup clean notebooks

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
	$(PY) -m pytest -q -p no:cacheprovider tests $(wildcard notebooks/*.ipynb) --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout=1200 --durations=10

# Maintainers: write the notebooks from notebooks/build_notebooks.py and execute them top to bottom,
# so that the committed outputs (which nbval compares) come from a clean run.
notebooks: $(VENV)/.installed
	cd notebooks && ../$(PY) build_notebooks.py $(NB)
	for nb in $(if $(NB),$(addprefix notebooks/,$(addsuffix .ipynb,$(NB))),notebooks/[0-9]*.ipynb); do \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 $$nb || exit 1; \
	done

clean:
	rm -rf $(VENV) results runs
