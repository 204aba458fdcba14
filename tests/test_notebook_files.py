"""The lessons as files: each is a jupytext percent file paired with its executed notebook, and what
every lesson shares (the Colab badge, the install cell, the environment cell) is the same everywhere."""

import re
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LESSONS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
REPOSITORY_URL = tomllib.loads((NOTEBOOKS.parent / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
REPOSITORY = REPOSITORY_URL.removeprefix("https://github.com/")


def _code(cells) -> list[str]:
    return [cell.source for cell in cells if cell.cell_type == "code"]


def test_every_lesson_is_a_pair():
    assert len(LESSONS) == 10
    assert sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == [p.stem for p in LESSONS]


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_the_percent_file_and_the_notebook_say_the_same(lesson):
    """The .py is the source people edit; the .ipynb must hold exactly its cells (then its outputs).
    After an edit: `make notebooks NB=<name>` (or `jupytext --sync`) brings the notebook along."""
    source = jupytext.read(lesson)
    executed = nbformat.read(lesson.with_suffix(".ipynb"), as_version=4)
    assert [(c.cell_type, c.source) for c in source.cells] == [(c.cell_type, c.source) for c in executed.cells], \
        f"{lesson.name} and its .ipynb differ: run `make notebooks NB={lesson.stem}`"
    assert executed.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_every_lesson_opens_with_the_shared_cells(lesson):
    cells = jupytext.read(lesson).cells
    first = jupytext.read(LESSONS[0]).cells
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{lesson.stem}.ipynb)")
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {lesson.stem[:2]} · ")
    assert badge in cells[0].source, f"{lesson.name}: the Colab badge must open this lesson from {REPOSITORY}"
    assert _code(cells)[:2] == _code(first)[:2], f"{lesson.name}: the install and environment cells differ from 00's"
    install = _code(cells)[0]
    assert f'REPOSITORY = "{REPOSITORY_URL}"' in install  # the one setting, from pyproject's [project.urls]


def test_no_cell_branches_on_the_machine():
    """One code path: the environment picks sizes (env.sized, env.memory_limit_bytes, ...); no cell
    runs different code on a GPU than CI runs on a CPU."""
    offenders = [f"{lesson.name}: {line.strip()}" for lesson in LESSONS
                 for line in lesson.read_text(encoding="utf-8").splitlines()
                 if re.search(r"\benv\.(on_gpu|is_t4|gpu_count|gpu_name)\b", line) and not line.lstrip().startswith("#")]
    assert not offenders, offenders


def test_committed_notebooks_hold_no_path_of_the_machine_that_ran_them():
    pattern = re.compile(r"(/work/|/home/[^/\s]+/|/root/|/tmp/|/Users/[^/\s]+/|\.venv/lib/python)")
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        found = pattern.findall(notebook.read_text(encoding="utf-8"))
        assert not found, f"{notebook.name} holds machine paths {sorted(set(found))}: re-run `make notebooks`"


def _checked_numbers(notebook: Path) -> tuple[list[float], str]:
    """The numbers in a notebook's checked outputs (the cells nbval compares), and their text."""
    text = []
    for cell in nbformat.read(notebook, as_version=4).cells:
        if cell.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in cell.source:
            for output in cell.get("outputs", []):
                text.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    joined = "\n".join(text)
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*\.?\d*", joined)], joined


def _readme_rows() -> dict[str, str]:
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\d\d) [^|]+\| (.+) \|$", readme, re.M)}


def _unchecked_figures(prose: str, notebook: Path) -> list[str]:
    """The figures in ``prose`` (GiB, percentages, counts) that no checked output of ``notebook``
    shows, to the precision the prose gives them."""
    return missing_from(prose, *_checked_numbers(notebook))


def missing_from(prose: str, numbers: list[float], text: str) -> list[str]:
    """The figures in ``prose`` that neither ``numbers`` (to the precision the prose gives them) nor,
    for a count, ``text`` holds: the one matching every figure test uses."""
    # not figures: flags (`--sub_batch_size 1`), lesson numbers, versions (FlagEmbedding 1.4.2)
    row = re.sub(r"`[^`]*`|\b\d\d:|\(\d\d\)|\d+\.\d+\.\d+", "", prose)
    missing = []
    for figure in re.findall(r"\d[\d,]*\.\d+|\d{1,3}(?:,\d{3})+|\d+(?=%)", row):
        if "," in figure and "." not in figure:
            found = figure in text or float(figure.replace(",", "")) in numbers  # a count or a length
        else:
            places = len(figure.split(".")[1]) if "." in figure else 0
            value = float(figure.replace(",", ""))
            found = any(abs(round(n, places) - value) < 1e-9 for n in numbers)
        if not found:
            missing.append(figure)
    return missing


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_the_readmes_notebook_table_quotes_the_checked_outputs(lesson):
    """Every figure in the README's row for a lesson is in that lesson's checked outputs."""
    missing = _unchecked_figures(_readme_rows()[lesson.stem[:2]], lesson.with_suffix(".ipynb"))
    assert not missing, f"README's row for {lesson.stem} quotes {missing}, which no checked output of it shows"


def test_the_readmes_short_answer_quotes_lessons_07_and_08():
    """The README's opening answer: every figure in lesson 07's or 08's checked outputs."""
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    section = readme.split("## The answer, in short", 1)[1].split("\n## ", 1)[0].replace("\n", " ")
    answers = sorted(NOTEBOOKS.glob("0[78]_*.ipynb"))
    missing = set(_unchecked_figures(section, answers[0])) & set(_unchecked_figures(section, answers[1]))
    assert len(answers) == 2 and "10.93" in section and not missing, f"README's answer quotes {missing}"


def test_the_readmes_commands_are_lesson_08s_answers():
    """The README's two commands are the ones lesson 08 prints for each platform, word for word but the
    data's path (the lesson runs in notebooks/, the README from the repository's folder)."""
    readme = (NOTEBOOKS.parent / "README.md").read_text()
    section = readme.split("## The answer, in short", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(torchrun .*?)\n```", section, re.S)
    (lesson,) = NOTEBOOKS.glob("08_*.ipynb")
    printed = "\n".join(output.get("text", "") for cell in nbformat.read(lesson, as_version=4).cells
                        if cell.cell_type == "code" for output in cell.get("outputs", []))
    assert len(commands) == 2 and "--nproc_per_node 1" in commands[0] and "--nproc_per_node 2" in commands[1]
    for command in commands:
        assert "--train_data data/train.jsonl" in command
        assert command.replace("--train_data data/train.jsonl", "--train_data ../data/train.jsonl") in printed


@pytest.mark.parametrize("lesson", [p for p in LESSONS if p.stem[:2] != "00"], ids=lambda p: p.stem)
def test_each_lesson_ends_with_its_answer_in_one_line_from_checked_outputs(lesson):
    last = nbformat.read(lesson.with_suffix(".ipynb"), as_version=4).cells[-1]
    assert last.cell_type == "markdown" and last.source.startswith("**In one line.**"), lesson.stem
    missing = _unchecked_figures(last.source.replace("\n", " "), lesson.with_suffix(".ipynb"))
    assert not missing, f"{lesson.stem}'s answer quotes {missing}, which no checked output of it shows"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_every_figure_a_lesson_states_is_in_its_checked_outputs(lesson):
    """Figures in prose come from checked cells: every figure in a lesson's text (GiB, percentages,
    counts) is in one of its NBVAL_CHECK_OUTPUT outputs, so a re-run that moves it fails here."""
    notebook = lesson.with_suffix(".ipynb")
    cells = nbformat.read(notebook, as_version=4).cells
    prose = " ".join(cell.source.replace("\n", " ") for cell in cells[1:] if cell.cell_type == "markdown")
    missing = _unchecked_figures(prose, notebook)
    assert not missing, f"{lesson.stem}'s text quotes {missing}, which no checked output of it shows"
