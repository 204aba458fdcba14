"""The Colab lane's verdict on the notebooks' install cell: on Colab's package set it changes nothing
Colab ships. Runs where `make test-colab` (.ci/colab/lane.sh) set M3LAB_COLAB_LANE to its folder of
`pip freeze` outputs; skipped elsewhere, saying so."""

import os
import re
from pathlib import Path

import pytest

LANE = os.environ.get("M3LAB_COLAB_LANE")
pytestmark = pytest.mark.skipif(not LANE, reason="only in the Colab lane (make test-colab)")

# Packages the install cell may change, each with the reason it must; empty is the goal.
ALLOWED_CHANGES: dict[str, str] = {}


def _freeze(path: Path) -> dict[str, str]:
    packages = {}
    for line in path.read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            packages[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return packages


def _colab() -> dict[str, str]:
    return _freeze(next(Path(LANE).parents[1].glob(".ci/colab/pip-freeze.gpu.*.txt")))


def test_the_install_cell_changes_no_package_the_runtime_had():
    before, after = _freeze(Path(LANE) / "before.txt"), _freeze(Path(LANE) / "after.txt")
    changed = {name: f"{version} -> {after.get(name, 'removed')}" for name, version in before.items()
               if after.get(name) != version and name not in ALLOWED_CHANGES}
    assert not changed, f"the install cell changed what Colab ships: {changed}"


def test_every_colab_package_the_install_needs_was_there_before_it():
    """Otherwise the lane installed it fresh, at any version, where Colab would have kept its own:
    add the name to .ci/colab/preinstalled.txt."""
    before, after, colab = (_freeze(Path(LANE) / "before.txt"), _freeze(Path(LANE) / "after.txt"), _colab())
    missing = sorted(name for name in after if name in colab and name not in before)
    assert not missing, f"add to .ci/colab/preinstalled.txt: {missing}"


def test_what_the_install_cell_adds():
    before, after = _freeze(Path(LANE) / "before.txt"), _freeze(Path(LANE) / "after.txt")
    added = sorted(set(after) - set(before))
    print("added:", ", ".join(f"{name} {after[name]}" for name in added))
    assert {"flagembedding", "deepspeed"} <= set(added)


def test_on_python_3_13_the_install_resolves_to_colabs_versions():
    """The lane's dry run with Python 3.13 (Colab's): pip found a set with Colab's exact versions."""
    import json

    report = Path(LANE) / "py313-report.json"
    if not report.exists():
        pytest.skip("no Python 3.13 on this machine: the lane skipped its dry run")
    chosen = {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    colab = _colab()
    assert chosen["torch"] == "2.11.0" and chosen["transformers"] == colab["transformers"]
    assert {"flagembedding", "deepspeed", "m3lab"} <= set(chosen)
    # torch's own CUDA runtime packages follow PyPI's torch (CUDA 13), not Colab's cu128 build
    own_cuda = ("torch", "cuda-", "nvidia-")
    assert {name: version for name, version in chosen.items()
            if name in colab and version != colab[name] and not name.startswith(own_cuda)} == {}
