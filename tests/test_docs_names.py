"""Every `m3lab.<name>` the README, docs/, the data READMEs and the lessons quote exists: a module or
attribute moved or renamed fails here instead of leaving a reader with a dead name."""

import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "data").rglob("README.md")),
           *sorted((REPO / "notebooks").glob("[0-9]*.py"))]


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for part in parts[split:]:
            if not hasattr(found, part):
                return False
            found = getattr(found, part)
        return True
    return False


def test_every_quoted_m3lab_name_exists():
    quoted = {(path.relative_to(REPO), name.rstrip("."))
              for path in SOURCES for name in re.findall(r"`(m3lab\.[A-Za-z_][\w.]*)", path.read_text())}
    assert len(quoted) > 20
    dead = sorted(f"{path}: {name}" for path, name in quoted if not _resolves(name))
    assert not dead, dead
