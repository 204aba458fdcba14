"""Where a resumed run goes on from: ``--resume_from_checkpoint latest``.

HF Trainer names its checkpoints ``<output_dir>/checkpoint-<step>``. ``latest`` is the newest complete
one (its ``trainer_state.json`` written, which HF does after the weights and the optimizer) found in
the run's output folder or, where a platform gives the last session's output back somewhere else
(Kaggle: a saved version's ``/kaggle/working`` comes back read-only under ``/kaggle/input``), in a
folder of the same name under ``--previous_output_dirs``. HF Trainer reads the checkpoint where it is
and writes the next ones to the output folder. With no checkpoint anywhere the run starts from the
beginning and says so, so that the same command serves every session, the first included.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
SEARCH_DEPTH = 4  # folders below a previous-output folder: Kaggle nests a version's output 1 to 3 deep


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    step: int


def checkpoints_in(folder: Path) -> list[Checkpoint]:
    """The complete checkpoints directly in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.fullmatch(child.name)
        if match and (child / "trainer_state.json").is_file():
            found.append(Checkpoint(child, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def _same_name_below(root: Path, name: str) -> list[Path]:
    """The folders called ``name`` at most SEARCH_DEPTH levels below ``root`` (``root`` itself included)."""
    found = [root] if root.name == name else []
    for here, folders, _ in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if depth >= SEARCH_DEPTH:
            folders.clear()
        found += [Path(here) / f for f in folders if f == name]
    return found


def latest_checkpoint(output_dir: str | os.PathLike, previous_output_dirs: list[str] = ()) -> Checkpoint | None:
    """The newest complete checkpoint of the run: in ``output_dir``, or in a folder of the same name
    under any of ``previous_output_dirs``; the output folder's own wins a tie."""
    output = Path(output_dir)
    places = [output] + [folder for root in previous_output_dirs for folder in _same_name_below(Path(root), output.name)]
    found = [checkpoint for place in places for checkpoint in checkpoints_in(place)]
    return max(found, key=lambda c: c.step, default=None)  # max keeps the first of equals: the output folder's


def where_it_looked(output_dir: str, previous_output_dirs: list[str]) -> str:
    names = [output_dir] + [f"a folder named {Path(output_dir).name} under {root}" for root in previous_output_dirs]
    return " or ".join(names)


def resolve(output_dir: str, previous_output_dirs: list[str] | None, log=print) -> str | None:
    """The checkpoint ``latest`` means for this run (None: none yet), said in a line."""
    previous = list(previous_output_dirs or [])
    found = latest_checkpoint(output_dir, previous)
    if found is None:
        log(f"m3lab: no checkpoint yet in {where_it_looked(output_dir, previous)}: the run starts from the beginning.")
        return None
    log(f"m3lab: going on from step {found.step}: {found.folder}")
    return str(found.folder)
