from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def standin_dir():
    """The tiny stand-in checkpoint (built once, cached under $M3LAB_CACHE)."""
    from m3lab.standin import standin_path

    return standin_path()


@pytest.fixture
def runs_root(tmp_path):
    return tmp_path / "runs"
