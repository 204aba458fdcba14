#!/usr/bin/env bash
# The Colab lane (make test-colab): Colab's GPU runtime as far as this machine can have it, the
# notebooks' own install cell run on top of it, then the tests in the clone that cell made.
#
# - Python 3.11 (this machine's; Colab runs 3.13, whose torch here would be a multi-GB CUDA build).
# - torch: the CPU build of 2.13.0 on this disk stands in for Colab's 2.11.0+cu128; Colab's
#   setuptools 75.2 is older than that torch needs, so both are left out of the constraints.
# - Every other package of m3lab's closure that Colab ships (.ci/colab/preinstalled.txt) is
#   installed first at Colab's version (its pip freeze as constraints).
# - The install cell is taken from notebooks/00_setup_and_data.py and run as a learner's kernel
#   runs it; M3LAB_SOURCE makes it clone this repository's HEAD instead of GitHub.
# - `pip freeze` before and after go to build/colab/; tests/test_colab_lane.py compares them.
# - COLAB_NOTEBOOKS=0 leaves out executing the notebooks (CI, for its 90 minutes; README gives the
#   last full run's result and date).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LANE=$ROOT/.venv-colab
OUT=$ROOT/build/colab
FREEZE=.ci/colab/pip-freeze.gpu.2026-08-19.txt
PYTHON=${PYTHON:-python3.11}

rm -rf "$LANE" "$OUT"
mkdir -p "$OUT"
"$PYTHON" -m venv "$LANE"
grep -v -E '^(torch|torchaudio|torchvision|torchcodec|setuptools)==' "$FREEZE" > "$OUT/constraints.txt"
"$LANE/bin/pip" install --quiet torch==2.13.0
"$LANE/bin/pip" install --quiet -c "$OUT/constraints.txt" -r .ci/colab/preinstalled.txt
"$LANE/bin/pip" freeze --all --exclude-editable > "$OUT/before.txt"

# The install cell, verbatim, in a fresh interpreter (a kernel) whose working folder is $OUT/content
mkdir -p "$OUT/content"
"$LANE/bin/python" .ci/colab/install_cell.py notebooks/00_setup_and_data.py > "$OUT/install_cell.py"
(cd "$OUT/content" && M3LAB_SOURCE="file://$ROOT" "$LANE/bin/python" "$OUT/install_cell.py")
"$LANE/bin/pip" freeze --all --exclude-editable > "$OUT/after.txt"

# Python 3.13, as Colab runs it: the same install must resolve to Colab's exact versions there too
# (a dry run: pip reads the wheels' metadata, so no multi-GB CUDA torch is downloaded), and m3lab's
# code must compile. The tests themselves run on 3.11 above, the only Python with a CPU torch here.
PY313=""
for candidate in python3.13 "$(pyenv root 2>/dev/null)"/versions/3.13*/bin/python3.13; do
    if "$candidate" -c "" 2>/dev/null; then PY313=$candidate; break; fi
done
if [ -n "$PY313" ]; then
    rm -rf "$OUT/py313" && "$PY313" -m venv "$OUT/py313"
    # Colab's torch 2.11.0+cu128 comes from PyTorch's own index (CUDA 12.8); PyPI's 2.11.0 (CUDA 13)
    # stands in for it, with the CUDA runtime packages left to it
    sed 's/^torch==2.11.0+cu128$/torch==2.11.0/' "$FREEZE" |
        grep -v -i -E '^(torchaudio|torchvision|torchcodec|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==' > "$OUT/constraints313.txt"
    "$OUT/py313/bin/pip" install --quiet --dry-run --ignore-installed --report "$OUT/py313-report.json" \
        -c "$OUT/constraints313.txt" "torch==2.11.0" "$ROOT"
    "$OUT/py313/bin/python" -m compileall -q "$ROOT/m3lab" > /dev/null
    echo "Python 3.13: the install resolves to Colab's versions; m3lab compiles"
else
    echo "Python 3.13 not found: its dry run is skipped"
fi

# Test tools, which a learner does not install: at Colab's versions where it ships them
"$LANE/bin/pip" install --quiet -c "$OUT/constraints.txt" pytest nbval ipykernel nbformat nbconvert jupytext

# The tests, from the clone the install cell made (as on Colab: m3lab-repo/ beside the notebook)
cd "$OUT/content/m3lab-repo"
export M3LAB_COLAB_LANE="$OUT" M3LAB_CACHE="$OUT/cache"
"$LANE/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" tests --durations=5

# The notebooks, executed top to bottom. Their checked outputs were written on CI's lock, and on this
# stack two things legitimately differ (the stand-in's random weights: transformers 5 initialises in
# another order; the allocator-cache estimates: transformers 5 allocates in another order), so here a
# lesson passes when every cell runs; how the checked cells differ goes to checked-cells.txt.
if [ "${COLAB_NOTEBOOKS:-1}" = 0 ]; then
    echo "Colab lane passed (notebooks not executed: COLAB_NOTEBOOKS=0)"
    exit 0
fi
mkdir -p "$OUT/executed"
for notebook in notebooks/[0-9]*.ipynb; do
    "$LANE/bin/jupyter" nbconvert --log-level WARN --to notebook --execute --ExecutePreprocessor.timeout=1800 \
        --output-dir "$OUT/executed" "$notebook"
done
"$LANE/bin/python" "$ROOT/.ci/colab/checked_cells.py" notebooks "$OUT/executed" > "$OUT/checked-cells.txt"
echo "Colab lane passed; checked cells that differ from CI's: $OUT/checked-cells.txt"
