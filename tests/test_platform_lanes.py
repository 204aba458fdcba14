"""A platform lane's verdict on the notebooks' install cell: on the platform's package set (Colab's, or
what is known of Kaggle's) it changes nothing the platform ships; on a fresh machine it gets today's
newest stack. Runs where `make test-colab`, `make test-kaggle` or `make test-fresh` (.ci/lane.sh) set
M3LAB_LANE to its folder of `pip freeze` outputs; skipped elsewhere, saying so."""

import json
import os
import re
from pathlib import Path

import pytest

LANE = os.environ.get("M3LAB_LANE")
PLATFORM = os.environ.get("M3LAB_LANE_PLATFORM", "colab")
pytestmark = pytest.mark.skipif(not LANE, reason="only in a platform lane (make test-colab, -kaggle, -fresh)")
on_a_platform = pytest.mark.skipif(PLATFORM == "fresh", reason="a fresh machine ships nothing to keep")

# Packages the install cell may change, each with the reason it must; empty is the goal.
ALLOWED_CHANGES: dict[str, str] = {}
# What a platform's lane takes at another version than its freeze says, and why (.ci/lane.sh)
FORCED = {"kaggle": {"protobuf": "5.29.5"}}  # Kaggle's Dockerfile pins it over Colab's 5.29.6
DRY_RUN_TORCH = {"colab": "2.11.0", "kaggle": "2.10.0"}


def _freeze(path: Path) -> dict[str, str]:
    packages = {}
    for line in path.read_text().splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            packages[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return packages


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _platform() -> dict[str, str]:
    (freeze,) = Path(LANE).parents[1].glob(f".ci/{PLATFORM}/*pip-freeze.gpu.*.txt")
    return {**_freeze(freeze), **FORCED.get(PLATFORM, {})}


@on_a_platform
def test_the_install_cell_changes_no_package_the_runtime_had():
    before, after = _freeze(Path(LANE) / "before.txt"), _freeze(Path(LANE) / "after.txt")
    changed = {name: f"{version} -> {after.get(name, 'removed')}" for name, version in before.items()
               if after.get(name) != version and name not in ALLOWED_CHANGES}
    assert not changed, f"the install cell changed what {PLATFORM} ships: {changed}"


@on_a_platform
def test_every_package_of_the_platform_the_install_needs_was_there_before_it():
    """Otherwise the lane installed it fresh, at any version, where the platform would have kept its
    own: add the name to .ci/preinstalled.txt."""
    before, after, shipped = (_freeze(Path(LANE) / "before.txt"), _freeze(Path(LANE) / "after.txt"), _platform())
    missing = sorted(name for name in after if name in shipped and name not in before)
    assert not missing, f"add to .ci/preinstalled.txt: {missing}"


def test_what_the_install_cell_adds():
    before, after = _freeze(Path(LANE) / "before.txt"), _freeze(Path(LANE) / "after.txt")
    added = sorted(set(after) - set(before))
    print("added:", ", ".join(f"{name} {after[name]}" for name in added))
    assert {"flagembedding", "deepspeed"} <= set(added)


@on_a_platform
def test_on_the_platforms_python_the_install_resolves_to_its_versions():
    """The lane's dry run with the platform's Python: pip found a set with the platform's exact versions."""
    report = Path(LANE) / "dry-report.json"
    if not report.exists():
        pytest.skip("the platform's Python is not on this machine: the lane skipped its dry run")
    chosen = {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    shipped = _platform()
    assert chosen["torch"] == DRY_RUN_TORCH[PLATFORM] and chosen["transformers"] == shipped["transformers"]
    assert {"flagembedding", "deepspeed", "m3lab"} <= set(chosen)
    # torch's own CUDA runtime packages follow PyPI's torch, not the platform's cu128 build
    own_cuda = ("torch", "cuda-", "nvidia-")
    assert {name: version for name, version in chosen.items()
            if name in shipped and version != shipped[name] and not name.startswith(own_cuda)} == {}


@pytest.mark.skipif(PLATFORM != "fresh", reason="the fresh lane's own check")
def test_a_fresh_install_gets_todays_newest_stack():
    """What a fresh pip resolved for the install cell on 2026-12-07 (issue 31): the lane tests that stack,
    or a newer one, not CI's lock (transformers 4.57.6)."""
    after = _freeze(Path(LANE) / "after.txt")
    assert _version(after["transformers"]) >= (5, 25) and _version(after["sentence-transformers"]) >= (6, 3)
    assert after["flagembedding"] == "1.4.2"
    import peft  # noqa: F401 (peft 0.17, which FlagEmbedding alone allows, fails to import on transformers 5)
