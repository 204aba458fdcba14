# Two commands do all set-up on a fresh machine (see README.md):
#   make run    the main job with embedded defaults (writes results/)
#   make test   every test: pytest and the notebooks under nbval
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast setup clean notebooks device-wheels lock test-colab test-kaggle test-fresh

# pyproject.toml states the ranges m3lab works with; constraints/ci.txt is the exact set CI tests.
$(VENV)/.installed: pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	# CPU torch first: a plain `pip install torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet -c constraints/ci.txt torch
	$(PY) -m pip install --quiet -c constraints/ci.txt -e '.[dev]'
	touch $@

# Maintainers: after changing a dependency in pyproject.toml, rewrite the lock from a fresh resolve.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet torch==2.13.0 && .venv-lock/bin/pip install --quiet -e '.[dev]'
	{ sed -n '1,3p' constraints/ci.txt; .venv-lock/bin/pip freeze --exclude-editable | grep -v '^m3lab'; } > constraints/ci.txt.tmp
	mv constraints/ci.txt.tmp constraints/ci.txt && rm -rf .venv-lock

setup: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m m3lab run

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider tests $(wildcard notebooks/*.ipynb) --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout=1200 --durations=10

# A contributor's own loop: the tests that launch no training run and execute no notebook (minutes).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests --durations=10

# The platform lanes: Colab's package set (.ci/colab/), or what is known of Kaggle's (.ci/kaggle/), the
# notebooks' install cell on top, then the fast tests and the notebooks there (.ci/lane.sh says what
# stands in for what).
test-colab:
	bash .ci/lane.sh colab

test-kaggle:
	bash .ci/lane.sh kaggle

# What a fresh pip resolves today on a learner's own machine (no platform package set)
test-fresh:
	bash .ci/lane.sh fresh

# Maintainers: the lessons' sources are notebooks/NN_*.py (jupytext percent files). This writes their
# cells into the paired .ipynb and executes it top to bottom, so that the committed outputs (which
# nbval compares) come from a clean run. NB=00_setup_and_data limits it to one lesson.
LESSONS = $(if $(NB),$(addprefix notebooks/,$(addsuffix .py,$(NB))),$(wildcard notebooks/[0-9]*.py))
notebooks: $(VENV)/.installed
	for lesson in $(LESSONS); do \
		$(VENV)/bin/jupytext --quiet --to ipynb --update $$lesson && \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 \
			$${lesson%.py}.ipynb || exit 1; \
	done

# Maintainers with a GPU machine that has only PyTorch (no network): the wheels of the training
# stack at this project's pins, for its Python, to carry there for `python -m m3lab.evidence.gpu_check`
# (data/measurements/README.md). DeepSpeed has no wheel on PyPI: it is built here, without its ops.
DEVICE_PYTHON ?= 3.12
DEVICE_WHEELS := transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 datasets==4.8.5 \
	FlagEmbedding==1.4.2 peft==0.21.2 fsspec==2026.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 \
	pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 bitsandbytes==0.50.2
device-wheels: $(VENV)/.installed
	rm -rf .whl && mkdir .whl
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d .whl $(DEVICE_WHEELS)
	DS_BUILD_OPS=0 $(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
	du -sh .whl

clean:
	rm -rf $(VENV) results runs
