"""Every figure docs/ quotes is one that a checked notebook output or a committed measurement shows.

Where a figure may come from (``SOURCES``):

- the checked outputs of the lessons: the outputs of the cells marked ``# NBVAL_CHECK_OUTPUT``, read by
  ``test_notebook_files._checked_numbers`` (what nbval holds to the code);
- the committed measurement and result files under ``data/``: ``*.json``, ``*.csv`` and ``*.md`` (the
  training data's lines, ``*.jsonl``, are not results). A byte count in a JSON file also counts as its
  GiB value (the files store ``max_memory_allocated`` in bytes; the docs quote GiB).

What a figure is, on each ``docs/*.md`` page:

- a decimal (``136.20``), a comma-grouped count (``8,192``): matched as
  ``test_notebook_files.missing_from`` matches the lessons' and the README's figures (``_untraced``
  calls it): found in a source
  to the precision the page gives it (``19.8`` is found in ``19.75``; a count as written or as a number);
- a whole number of GiB or GB (``61 GiB``), matched the same way;
- a percentage (``0.5%``): found in a source *as a percentage*, to the precision the page gives it
  (``2%`` in ``2.0%``), not merely as a number.

What is not a figure:

- what stands in backticks (flags, code, file names: `--sub_batch_size 1`);
- a version: a number with two dots (``1.4.2``), or one right after a package's or tool's name in
  ``PACKAGES`` (``torch 2.11``, ``transformers 5.15``, ``Python 3.13``);
- a duration (a number, or a range ``1.3 to 1.5``, followed by ``s``, ``ms``, ``us`` or ``minutes``):
  wall-clock timings of a shared 2-core machine, which no committed file records; each page says
  where and when it took them (testing.md's "Times", benchmarks.md, buckets.md);
- integers without a unit, ``%`` or thousands' comma (counts of lines, layers, steps), and MiB/KB
  amounts (the caching allocator's constants, a tolerance);
- a figure from a cited external source, listed in ``EXTERNAL`` with the source the page names beside it.

A figure that no source shows is reworded or removed on the page; ``EXTERNAL`` is not a way around that
for the project's own figures.
"""

import re
from pathlib import Path

import pytest
from test_notebook_files import _checked_numbers, missing_from

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").glob("*.md"))
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
DATA = sorted(p for p in (REPO / "data").rglob("*") if p.suffix in {".json", ".csv", ".md"})

PACKAGES = ("torch", "transformers", "sentence-transformers", "huggingface_hub", "numpy", "protobuf", "datasets",
            "accelerate", "peft", "matplotlib", "FlagEmbedding", "DeepSpeed", "bitsandbytes", "ir-datasets",
            "ir_datasets", "rank-bm25", "hjson", "ninja", "lz4", "Python", "CUDA")

# (page, figure): the external source, as the page names it within a few lines of the figure
EXTERNAL = {
    ("predictor.md", "65"): "datasheet",  # the T4's datasheet fp16 peak, 65 TFLOPS on tensor cores
    ("predictor.md", "15.75"): "PCI-SIG",  # PCIe Gen3 x16's rate in one direction, the T4's host link
    ("buckets.md", "80"): "paper",  # the BGE-M3 paper's Table 9: batch sizes found by trial on 80 GB cards
}

_VERSION = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in PACKAGES) + r")\s+\d+(?:\.\d+)*", re.I)
_NUMBER = r"\d[\d,]*(?:\.\d+)?"
_DURATION = re.compile(rf"{_NUMBER}(?:\s*(?:to|and|-)\s*{_NUMBER})?\s*(?:s|ms|us|minutes?)\b")
_WHOLE_GIB = re.compile(r"(?<![\d.,])(\d+)\s*(?:GiB|GB)\b")
_PERCENT = re.compile(r"(?<![\d.,])(\d+(?:\.\d+)?)%")


def _data_numbers(path: Path) -> tuple[list[float], str]:
    text = path.read_text(encoding="utf-8")
    numbers = [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", text)]
    if path.suffix == ".json":
        numbers += [n / 2**30 for n in numbers if n >= 2**20]
    return numbers, text


SOURCES = ([(nb.name, *_checked_numbers(nb)) for nb in NOTEBOOKS]
           + [(str(p.relative_to(REPO)), *_data_numbers(p)) for p in DATA])


def _untraced(prose: str, numbers: list[float], text: str) -> list[str]:
    """``test_notebook_files``' matching, on any source's numbers and text."""
    return missing_from(prose, numbers, text)


def _at_precision(figure: str, values: list[float]) -> bool:
    places = len(figure.split(".")[1]) if "." in figure else 0
    return any(abs(round(v, places) - float(figure)) < 1e-9 for v in values)


def _untraced_in(prose: str, numbers: list[float], text: str) -> set[str]:
    """The figures of ``prose`` (already without what is not a figure) that one source lacks."""
    percentages = _PERCENT.findall(prose)
    rest = _PERCENT.sub(" ", prose)
    missing = set(_untraced(rest, numbers, text))
    missing |= {g for g in _WHOLE_GIB.findall(rest) if not _at_precision(g, numbers)}
    shown = [float(p) for p in _PERCENT.findall(text)]
    missing |= {f"{p}%" for p in percentages if not _at_precision(p, shown)}
    return missing


def untraced_figures(prose: str, page: str = "") -> list[str]:
    """The figures ``prose`` quotes that no checked output and no file under data/ shows."""
    prose = re.sub(r"`[^`]*`", " ", prose.replace("\n", " "))
    prose = _DURATION.sub(" ", _VERSION.sub(" ", prose))
    missing = None
    for _, numbers, text in SOURCES:
        here = _untraced_in(prose, numbers, text)
        missing = here if missing is None else missing & here
        if not missing:
            return []
    return sorted(f for f in missing if (page, f.rstrip("%")) not in EXTERNAL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_figure_of_the_page_is_in_a_checked_output_or_a_measurement(page):
    missing = untraced_figures(page.read_text(encoding="utf-8"), page.name)
    assert not missing, (f"docs/{page.name} quotes {missing}, which no checked notebook output and no file "
                         f"under data/ shows: reword or remove them")


def test_a_made_up_figure_fails():
    assert untraced_figures("the step needs 12.34 GiB") == ["12.34"]
    assert untraced_figures("a 617 GiB card") == ["617"]
    assert untraced_figures("a 987,654-line file") == ["987,654"]
    assert untraced_figures("within 97% of it") == ["97%"]
    assert untraced_figures("within 3% of it") == ["3%"]  # 3 is in many outputs, but never as a percentage
    # traced: a checked output (lesson 01), a measurement file, a percentage shown as one
    assert untraced_figures("136.60 GiB predicted, 136.20 measured, within 0.5%, 61.04 GiB") == []
    # not figures: code, versions, durations, an external source's figure on its page
    assert untraced_figures("`--sub_batch_size 12.34`, torch 12.34, FlagEmbedding 9.8.7, 12.34 s, 1.5 ms, "
                            "12.34 to 56.78 s") == []
    assert untraced_figures("65 TFLOPS", "predictor.md") == [] and untraced_figures("65.5 TFLOPS") == ["65.5"]


def test_every_external_figure_stands_beside_its_source():
    for (page, figure), source in EXTERNAL.items():
        text = " ".join((REPO / "docs" / page).read_text(encoding="utf-8").split())
        found = list(re.finditer(rf"(?<![\d.,]){re.escape(figure)}(?![\d,])", text))
        assert found, f"docs/{page} no longer quotes {figure}: drop it here"
        assert all(source in text[max(0, m.start() - 300):m.end() + 300] for m in found), (
            f"docs/{page} quotes {figure} without naming its source ({source}) within a few lines")




_MODULE = re.compile(r"python3? -m (m3lab(?:\.\w+)*)")
READ = [REPO / "README.md", *PAGES, *sorted((REPO / "data").rglob("*.md")), *sorted((REPO / "notebooks").glob("*.py"))]


def test_every_module_a_page_tells_to_run_exists():
    """``python -m m3lab.X`` in the README, docs/, data/'s pages and the lessons names a module there is."""
    import importlib.util

    named = {(path.relative_to(REPO).as_posix(), module) for path in READ
             for module in _MODULE.findall(path.read_text(encoding="utf-8"))}
    assert len(named) > 10
    assert [(page, module) for page, module in sorted(named) if importlib.util.find_spec(module) is None] == []
