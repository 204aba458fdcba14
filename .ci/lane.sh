#!/usr/bin/env bash
# A platform lane (make test-colab, make test-kaggle): the platform's runtime as far as this machine
# can have it, the notebooks' own install cell run on top of it, then the tests in the clone that cell made.
#
#   bash .ci/lane.sh colab|kaggle|fresh
#
# - colab: Colab's published GPU `pip freeze` (.ci/colab/, Python 3.13, torch 2.11.0+cu128).
# - kaggle: what is known of Kaggle's image (.ci/kaggle/): Colab's GPU freeze of 2026-05-08, from which
#   Kaggle's image is built (Python 3.12, torch 2.10.0+cu128, transformers 5.0.0 (Kaggle then installs the
#   newest 5.x when it builds), accelerate 1.13, peft 0.19.1, numpy 2.0.2), with protobuf at the 5.29.5
#   Kaggle forces.
# - fresh: a learner's own machine: nothing but the CPU torch below, so the install cell gets what a
#   fresh pip resolves today (transformers 5.25, sentence-transformers 6.3 on 2026-12-07).
# - The tests run on Python 3.11 with the CPU build of torch 2.13.0 on this disk standing in for the
#   platform's CUDA torch (a CUDA build would be several GB); the platform's own Python gets a dry run
#   of the same install against the platform's versions (pip reads the wheels' metadata, so no CUDA
#   torch is downloaded), which must resolve to them, and m3lab is compiled there.
# - Every other package of m3lab's closure that the platform ships (.ci/preinstalled.txt) is installed
#   first at the platform's version, so that anything the cell would change there changes here too.
# - The install cell is taken from notebooks/00_setup_and_data.py and run as a learner's kernel runs
#   it; M3LAB_SOURCE makes it clone this repository's HEAD instead of GitHub.
# - `pip freeze` before and after go to build/<platform>/; tests/test_platform_lanes.py compares them.
# - The fast tests of what the platform's versions decide (LANE_TESTS, below), then the notebooks.
# - NOTEBOOKS=0 leaves out executing the notebooks (CI, for its 90 minutes; docs/colab-and-kaggle.md
#   gives the last full run's result and date).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PLATFORM=${1:?usage: bash .ci/lane.sh colab|kaggle|fresh}
case "$PLATFORM" in
    fresh) FREEZE=""; DRY_PYTHON=""; DRY_TORCH=""; FORCED="" ;;
    colab) FREEZE=.ci/colab/pip-freeze.gpu.2026-08-19.txt; DRY_PYTHON=3.13; DRY_TORCH=2.11.0; FORCED="" ;;
    kaggle) FREEZE=.ci/kaggle/base-image-pip-freeze.gpu.2026-05-08.txt; DRY_PYTHON=3.12; DRY_TORCH=2.10.0
            FORCED="protobuf==5.29.5" ;;
    *) echo "unknown platform $PLATFORM: colab, kaggle or fresh" >&2; exit 2 ;;
esac
LANE=$ROOT/.venv-$PLATFORM
OUT=$ROOT/build/$PLATFORM
PYTHON=${PYTHON:-python3.11}

rm -rf "$LANE" "$OUT"
mkdir -p "$OUT"
"$PYTHON" -m venv "$LANE"
# torch and what it pins, and setuptools (older than this torch needs), are left to the stand-in torch
if [ -n "$FREEZE" ]; then
    grep -v -E '^(torch|torchaudio|torchvision|torchcodec|setuptools|protobuf)==' "$FREEZE" > "$OUT/constraints.txt"
    grep -E '^protobuf==' "$FREEZE" | sed "s/^protobuf==.*/${FORCED:-&}/" >> "$OUT/constraints.txt"
else
    : > "$OUT/constraints.txt"  # a fresh machine: no constraints
fi
"$LANE/bin/pip" install --quiet torch==2.13.0
[ -z "$FREEZE" ] || "$LANE/bin/pip" install --quiet -c "$OUT/constraints.txt" -r .ci/preinstalled.txt
"$LANE/bin/pip" freeze --all --exclude-editable > "$OUT/before.txt"

# The install cell, verbatim, in a fresh interpreter (a kernel) whose working folder is $OUT/content
mkdir -p "$OUT/content"
"$LANE/bin/python" .ci/install_cell.py notebooks/00_setup_and_data.py > "$OUT/install_cell.py"
(cd "$OUT/content" && M3LAB_SOURCE="file://$ROOT" "$LANE/bin/python" "$OUT/install_cell.py")
"$LANE/bin/pip" freeze --all --exclude-editable > "$OUT/after.txt"

# The platform's own Python: the same install must resolve to the platform's exact versions there
DRY=""
if [ -n "$DRY_PYTHON" ]; then
    for candidate in "python$DRY_PYTHON" "$(pyenv root 2>/dev/null)"/versions/$DRY_PYTHON*/bin/python$DRY_PYTHON; do
        if "$candidate" -c "" 2>/dev/null; then DRY=$candidate; break; fi
    done
fi
if [ -n "$DRY" ]; then
    rm -rf "$OUT/dry" && "$DRY" -m venv "$OUT/dry"
    # the platform's torch comes from PyTorch's own CUDA index; PyPI's release of the same version stands in
    # for it, with the CUDA runtime packages left to it
    sed -E "s/^torch==$DRY_TORCH\+cu[0-9]+$/torch==$DRY_TORCH/" "$FREEZE" |
        grep -v -i -E '^(torchaudio|torchvision|torchcodec|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==' > "$OUT/constraints-dry.txt"
    [ -z "$FORCED" ] || sed -i "s/^protobuf==.*/$FORCED/" "$OUT/constraints-dry.txt"
    "$OUT/dry/bin/pip" install --quiet --dry-run --ignore-installed --report "$OUT/dry-report.json" \
        -c "$OUT/constraints-dry.txt" "torch==$DRY_TORCH" "$ROOT"
    "$OUT/dry/bin/python" -m compileall -q "$ROOT/m3lab" > /dev/null
    echo "Python $DRY_PYTHON: the install resolves to $PLATFORM's versions; m3lab compiles"
elif [ -n "$DRY_PYTHON" ]; then
    echo "Python $DRY_PYTHON not found: its dry run is skipped"
fi

# Test tools, which a learner does not install: at the platform's versions where it ships them
"$LANE/bin/pip" install --quiet -c "$OUT/constraints.txt" pytest nbval ipykernel nbformat nbconvert jupytext

# The tests, from the clone the install cell made (as on Colab: m3lab-repo/ beside the notebook)
cd "$OUT/content/m3lab-repo"
export M3LAB_LANE="$OUT" M3LAB_LANE_PLATFORM="$PLATFORM" M3LAB_CACHE="$OUT/cache"
# The tests of what the platform's versions decide (LANE_TESTS=all: every fast test, as `make test-colab`
# by hand may): the install's packages (platform_lanes), every reach into third-party internals
# (compat), upstream's traps, the stand-in built and loaded, FlagEmbedding's own argument parsing of the
# commands (config, paste, cli: full-size predictions through the transformers patch), the data checks,
# the saved model in BGEM3FlagModel and sentence-transformers, the resume. The predictor's and the
# planner's own tests (many full-size traces, the same code on every stack) stay with CI's lock.
LANE_TESTS=${LANE_TESTS:-"tests/test_platform_lanes.py tests/test_compat.py tests/test_traps.py tests/test_standin.py
    tests/test_config.py tests/test_paste.py tests/test_cli.py tests/test_data.py tests/test_use.py
    tests/test_saved_model.py tests/test_resume.py"}
if [ "$LANE_TESTS" = all ]; then LANE_TESTS=tests; fi
# shellcheck disable=SC2086 (a list of files)
"$LANE/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" $LANE_TESTS --durations=5

# The notebooks, executed top to bottom. Their checked outputs were written on CI's lock, and on this
# stack two things legitimately differ (the stand-in's random weights: transformers 5 initialises in
# another order; the allocator's layout: transformers 5 allocates in another order), so here a lesson
# passes when every cell runs; how the checked cells differ goes to checked-cells.txt.
if [ "${NOTEBOOKS:-1}" = 0 ]; then
    echo "$PLATFORM lane passed (notebooks not executed: NOTEBOOKS=0)"
    exit 0
fi
mkdir -p "$OUT/executed"
for notebook in notebooks/[0-9]*.ipynb; do
    "$LANE/bin/jupyter" nbconvert --log-level WARN --to notebook --execute --ExecutePreprocessor.timeout=1800 \
        --output-dir "$OUT/executed" "$notebook"
done
"$LANE/bin/python" "$ROOT/.ci/checked_cells.py" notebooks "$OUT/executed" > "$OUT/checked-cells.txt"
echo "$PLATFORM lane passed; checked cells that differ from CI's: $OUT/checked-cells.txt"
