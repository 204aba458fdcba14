"""Print the install cell of a lesson (a jupytext percent file): the code cell that fetches m3lab.

The Colab lane runs what this prints, so that it tests the cell learners run, not a copy of it.
"""
import sys
from pathlib import Path

MARKER = "# Colab / Kaggle: fetch m3lab"

cells = Path(sys.argv[1]).read_text(encoding="utf-8").split("\n# %%")
found = [cell.split("\n", 1)[1] for cell in cells if cell.split("\n", 1)[1:] and
         cell.split("\n", 1)[1].startswith(MARKER)]
if len(found) != 1:
    sys.exit(f"{sys.argv[1]}: expected one cell starting with {MARKER!r}, found {len(found)}")
print(found[0].rstrip())
