from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_saved_traces_where_code_is_patched(request):
    """A test that patches code (``monkeypatch``) may patch the predictor's: its traces are neither
    read from nor written to the saved ones (``m3lab.predict.saved_traces``)."""
    if "monkeypatch" not in request.fixturenames:
        yield
        return
    request.getfixturevalue("monkeypatch").setenv("M3LAB_SAVED_TRACES", "0")
    yield


@pytest.fixture(scope="session")
def standin_dir():
    """The tiny stand-in checkpoint (built once, cached under $M3LAB_CACHE)."""
    from m3lab.standin import standin_path

    return standin_path()


@pytest.fixture
def runs_root(tmp_path):
    return tmp_path / "runs"
