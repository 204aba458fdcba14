"""The answers predicted on a platform's own package set, kept in a file a lesson reads.

The lessons' predictions run on CI's lock (transformers 4.57); Colab ships transformers 5.15 and
Kaggle a 5.x, which build the model and allocate its tensors in another order, so the same run can
need more or less of the card there. ``python -m m3lab.evidence.platform_stack --platform colab-t4
--out FILE``, run in a platform lane's venv (``make test-colab`` builds it: ``.venv-colab/``), finds
the platform's two answers for the series' sample (FlagEmbedding as it is; m3lab's levers) with that
venv's packages and writes what each needs. Lessons 07 and 08 set the file beside their own figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from m3lab.config import DEFAULT_TRAIN_DATA
from m3lab.gpus import GIB
from m3lab.io import write_json_atomic

RESULTS = Path(__file__).resolve().parents[2] / "data" / "predictions"  # the committed runs
PACKAGES = ("transformers", "torch", "deepspeed", "FlagEmbedding", "accelerate", "peft")


@dataclass(frozen=True)
class StackAnswer:
    """One answer as the platform's packages predict it (bytes for a T4)."""

    title: str
    run: str  # the run's first figure line: setting, group, lengths, batch, GPUs (what sets its memory)
    peak_bytes: int
    needs_bytes: int
    usable_bytes: int

    @property
    def spare_bytes(self) -> int:
        return self.usable_bytes - self.needs_bytes


@dataclass(frozen=True)
class StackAnswers:
    """A platform's answers predicted with its package set (``packages``: name -> version)."""

    platform: str
    date: str
    packages: dict[str, str]
    data: str
    answers: list[StackAnswer]

    def describe_packages(self) -> str:
        return ", ".join(f"{name} {version}" for name, version in self.packages.items())

    def beside(self, answer) -> list[str]:
        """Lines setting ``answer`` (a ``recipes.Answer`` predicted here) beside this stack's figures."""
        from m3lab.plan.platforms import PLATFORMS

        here = answer.report
        theirs = next((a for a in self.answers if a.title == answer.title), None)
        name = PLATFORMS[self.platform].name
        lines = [f"## {answer.title}",
                 f"  {here.provenance}, with this notebook's packages ({_version('transformers')}): needs "
                 f"{here.total_bytes / GIB:.2f} GiB, {here.spare_bytes / GIB:.2f} GiB to spare"]
        if theirs is None or theirs.run != answer.figures()[0]:
            return lines + [f"  with {name}'s packages: not on record for this run (run `python -m "
                            f"m3lab.evidence.platform_stack --platform {self.platform}` in its lane's venv)"]
        moved = (theirs.spare_bytes - here.spare_bytes) / 2**20
        return lines + [f"  {here.provenance}, with {name}'s packages (transformers {self.packages['transformers']}, "
                        f"{self.date}): "
                        f"needs {theirs.needs_bytes / GIB:.2f} GiB, {theirs.spare_bytes / GIB:.2f} GiB to spare: "
                        f"the spare moves by {moved:+,.0f} MiB"]


def _version(package: str) -> str:
    return f"{package} {metadata.version(package)}"


def predict(platform: str, data: str = DEFAULT_TRAIN_DATA) -> StackAnswers:
    """``platform``'s two answers for ``data``, predicted with the installed packages."""
    from m3lab.plan import recipes

    found = []
    for stock in (True, False):
        answer = recipes.answer_for(platform, stock=stock, data=data)
        if answer is not None:
            report = answer.report
            found.append(StackAnswer(answer.title, answer.figures()[0], report.peak_allocated_bytes, report.total_bytes,
                                     report.usable_bytes))
    packages = {name: metadata.version(name) for name in PACKAGES}
    return StackAnswers(platform, datetime.date.today().isoformat(), packages, Path(data).name, found)


def result_path(platform: str) -> Path:
    return RESULTS / f"answers-{platform}-packages.json"


def load(platform: str) -> StackAnswers:
    """The committed run for ``platform``."""
    raw = json.loads(result_path(platform).read_text(encoding="utf-8"))
    return StackAnswers(**{**raw, "answers": [StackAnswer(**a) for a in raw["answers"]]})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m m3lab.evidence.platform_stack", description=__doc__.split("\n")[0])
    parser.add_argument("--platform", required=True, choices=("colab-t4", "kaggle-t4x2"))
    parser.add_argument("--data", default=DEFAULT_TRAIN_DATA)
    parser.add_argument("--out", help="write the result here as JSON (the committed one: data/predictions/answers-PLATFORM-packages.json)")
    args = parser.parse_args(argv)
    result = predict(args.platform, args.data)
    for answer in result.answers:
        print(f"{answer.title}: needs {answer.needs_bytes / GIB:.2f} GiB, {answer.spare_bytes / GIB:.2f} GiB to spare")
    if args.out:
        write_json_atomic(args.out, dataclasses.asdict(result))


if __name__ == "__main__":
    main()
