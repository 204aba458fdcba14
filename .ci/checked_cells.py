"""How the lane's executed notebooks differ from the committed ones in their checked cells
(# NBVAL_CHECK_OUTPUT): a unified diff per cell, for the record, not a verdict."""
import difflib
import sys
from pathlib import Path

import nbformat


def checked_outputs(path: Path) -> dict[int, str]:
    cells = nbformat.read(path, as_version=4).cells
    return {index: "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("name") == "stdout")
            for index, cell in enumerate(cells)
            if cell.cell_type == "code" and cell.source.lstrip().startswith("# NBVAL_CHECK_OUTPUT")}


committed_dir, executed_dir = map(Path, sys.argv[1:3])
for committed in sorted(committed_dir.glob("[0-9]*.ipynb")):
    before, after = checked_outputs(committed), checked_outputs(executed_dir / committed.name)
    same = sum(before[i] == after.get(i) for i in before)
    print(f"== {committed.name}: {same} of {len(before)} checked cells identical")
    for index in before:
        if before[index] != after.get(index):
            print("".join(difflib.unified_diff(before[index].splitlines(True), after.get(index, "").splitlines(True),
                                               f"cell {index} (CI's lock)", f"cell {index} (Colab lane)", n=0)))
