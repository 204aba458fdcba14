import json
from pathlib import Path

import pytest

from m3lab.data.jsonl import (
    DataError,
    length_covering,
    load_jsonl,
    token_length_stats,
    validate_jsonl,
)

BAD = Path(__file__).parent / "fixtures" / "bad_data"

# fixture file -> (line reported, words the message must contain)
EXPECTED = {
    "01-invalid-json": (2, "invalid JSON"),
    "02-not-an-object": (2, "not a JSON object"),
    "03-missing-query": (2, '"query" is missing'),
    "04-query-not-string": (2, '"query" is a number'),
    "05-empty-query": (2, '"query" is empty'),
    "06-missing-pos": (2, '"pos" is missing'),
    "07-pos-not-list": (2, '"pos" is a string'),
    "08-empty-pos": (2, '"pos" is an empty list'),
    "09-pos-non-string": (2, '"pos"[1] is a number'),
    "10-pos-empty-string": (2, '"pos"[0] is an empty string'),
    "11-missing-neg": (2, '"neg" is missing'),
    "12-neg-not-list": (2, '"neg" is an object'),
    "13-empty-neg": (2, '"neg" is an empty list'),
    "14-neg-non-string": (2, '"neg"[1] is null'),
    "15-pos-scores-count": (2, '"pos_scores" has 2 score(s) but "pos" has 1'),
    "16-neg-scores-type": (2, '"neg_scores"[0] is a string'),
    "17-scores-not-list": (2, '"pos_scores" is a number'),
    "18-score-not-finite": (2, "finite"),
    "19-score-boolean": (2, '"pos_scores"[0] is true/false'),
    "20-prompt-not-string": (2, '"prompt" is a list'),
    "21-type-not-string": (2, '"type" is a number'),
    "22-scores-on-some-lines": (2, "some lines have pos_scores/neg_scores and others do not"),
    "23-empty-file": (0, "no records"),
    "24-not-utf8": (2, "not valid UTF-8"),
}


def test_every_fixture_has_an_expectation():
    assert sorted(p.stem for p in BAD.glob("*.jsonl")) == sorted(EXPECTED)
    assert len(EXPECTED) >= 15


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_line_is_reported_with_file_line_and_reason(name):
    path = BAD / f"{name}.jsonl"
    line, words = EXPECTED[name]
    with pytest.raises(DataError) as caught:
        load_jsonl(path)
    problems = caught.value.problems
    assert len(problems) == 1, problems
    assert problems[0].line == line
    assert words in problems[0].message
    assert (f"{path}:{line}: " if line else f"{path}: ") in str(caught.value)  # line 0: the whole file


def test_all_bad_lines_are_reported_at_once(tmp_path):
    lines = [(BAD / f"{name}.jsonl").read_bytes().splitlines()[1] for name in sorted(EXPECTED)[:21]]
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    _, problems = validate_jsonl(path)
    assert {p.line for p in problems} == set(range(1, 22))


def test_problems_in_several_files_are_all_reported():
    with pytest.raises(DataError) as caught:
        load_jsonl([BAD / "03-missing-query.jsonl", BAD / "08-empty-pos.jsonl"])
    assert {Path(p.path).name for p in caught.value.problems} == {"03-missing-query.jsonl", "08-empty-pos.jsonl"}


def test_missing_file_is_a_data_error_not_a_traceback(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_scores_are_required_only_for_knowledge_distillation(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    assert len(load_jsonl(path)) == 1
    with pytest.raises(DataError, match="knowledge_distillation is on"):
        load_jsonl(path, knowledge_distillation=True)


def test_negatives_may_be_absent_when_group_size_is_one(tmp_path):
    path = tmp_path / "pos-only.jsonl"
    path.write_text(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    assert len(load_jsonl(path, need_negatives=False)) == 1


def test_sample_data_is_valid():
    assert len(load_jsonl("data/train.jsonl")) >= 200
    assert len(load_jsonl("data/eval.jsonl")) >= 50


class WhitespaceTokenizer:
    """Counts words plus two special tokens, so expected lengths can be worked out by hand."""

    def __call__(self, texts, add_special_tokens=True, truncation=False):
        return {"input_ids": [[0] + [1] * len(t.split()) + [2] for t in texts]}


def test_token_length_stats_by_hand():
    records = [{"query": "a b", "pos": ["w " * n], "neg": ["x " * (n + 100)]} for n in range(1, 101)]
    stats = {s.field: s for s in token_length_stats(records, WhitespaceTokenizer(), query_max_len=3,
                                                    passage_max_len=52)}
    assert stats["query"].count == 100 and stats["query"].max == 4 and stats["query"].truncated_share == 1.0
    pos = stats["pos"]  # lengths 3..102
    assert (pos.p50, pos.p90, pos.max) == (52, 92, 102)  # smallest lengths that keep 50% / 90% whole
    assert pos.truncated_share == pytest.approx(0.5)  # 53..102 exceed 52
    cut = sum(max(0, n + 2 - 52) for n in range(1, 101)) / sum(n + 2 for n in range(1, 101))
    assert pos.truncated_token_share == pytest.approx(cut)
    assert stats["passage"].count == 200
    assert length_covering(pos, 0.9) == 92


def _line(**fields) -> str:
    return json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], **fields})


def test_a_byte_order_mark_is_read_past_as_flagembeddings_loader_does(tmp_path):
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{_line()}\r\n{_line()}\r\n".encode())
    assert len(load_jsonl(path)) == 2


def test_a_line_cut_short_is_reported_at_its_end_with_what_is_missing(tmp_path):
    long_line = _line(pos=["word " * 5000])
    path = tmp_path / "cut.jsonl"
    path.write_text(f"{_line()}\n{long_line[:-1]}\n")
    _, problems = validate_jsonl(path)
    assert [p.line for p in problems] == [2]
    assert f"the line ends (column {len(long_line) - 1})" in problems[0].message
    assert "closing brace, bracket or quote is missing" in problems[0].message


def test_bad_json_inside_a_line_is_reported_at_its_column(tmp_path):
    path = tmp_path / "unquoted.jsonl"
    path.write_text(_line().replace('"pos"', "pos") + "\n")
    _, problems = validate_jsonl(path)
    assert "invalid JSON at column 16:" in problems[0].message  # `pos` starts at character 16


def test_a_missing_file_is_named_without_a_line_number(tmp_path):
    _, problems = validate_jsonl(tmp_path / "nope.jsonl")
    assert str(problems[0]).startswith(f"{tmp_path / 'nope.jsonl'}: the file does not exist")


def test_reading_the_repositorys_sample_from_another_folder_is_said(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    done = subprocess.run([sys.executable, "-m", "m3lab", "validate", "data/train.jsonl"], capture_output=True,
                          text=True)
    assert done.returncode == 0
    assert "note: there is no data/train.jsonl in this folder" in done.stderr
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(_line() + "\n")
    done = subprocess.run([sys.executable, "-m", "m3lab", "validate", "data/train.jsonl"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "note:" not in done.stderr and "1 valid records" in done.stdout
