"""What the learner's fine-tune is judged on: the series' split, their own eval file, or a share held out."""

import json

import pytest

from m3lab.data.held_out import MIN_HELD_OUT, prepare
from m3lab.data.jsonl import REPO_ROOT, load_jsonl
from m3lab.use.evaluate import _held_out

SAMPLE = REPO_ROOT / "data" / "train.jsonl"


def test_the_series_sample_keeps_the_split_it_was_made_with(tmp_path):
    judged = prepare("data/train.jsonl", folder=tmp_path)
    assert (judged.train, judged.eval, judged.corpus) == ("data/train.jsonl", "data/eval.jsonl", "data/corpus.jsonl")
    assert not list(tmp_path.iterdir())
    assert judged.describe().endswith("judged on 50 held-out queries (data/eval.jsonl) over 303 passages "
                                      "(data/corpus.jsonl)")


def test_a_tenth_of_the_learners_file_is_held_out_the_same_way_each_time(tmp_path):
    mine = tmp_path / "my file.jsonl"
    mine.write_text(SAMPLE.read_text())
    judged = prepare(mine, folder=tmp_path / "split")
    train, held = load_jsonl(judged.train), load_jsonl(judged.eval, need_negatives=False)
    assert (len(train), len(held)) == (226, 25)
    assert {r["query"] for r in train}.isdisjoint(r["query"] for r in held)
    assert sorted(r["query"] for r in train + held) == sorted(r["query"] for r in load_jsonl(mine))
    records, corpus, relevant = _held_out(judged.eval, judged.corpus)  # the evaluation reads them as they are
    assert len(records) == 25 and len(corpus) == len(set(corpus)) and all(relevant)
    assert judged.how == "25 of 251 lines held out (seed 42)"
    prepare(mine, folder=tmp_path / "again")
    assert (tmp_path / "again" / "my file.eval.jsonl").read_text() == (tmp_path / "split" / "my file.eval.jsonl").read_text()


def test_too_few_lines_to_hold_any_out_say_so(tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:MIN_HELD_OUT + 5]))
    with pytest.raises(ValueError, match=r"small.jsonl: 15 lines are too few to hold 10 out .* \(MY_EVAL\)"):
        prepare(small, folder=tmp_path / "split")
    assert not (tmp_path / "split").exists()


def test_the_learners_own_eval_file_gets_a_corpus_of_every_passage(tmp_path):
    own = tmp_path / "eval.jsonl"
    own.write_text(json.dumps({"query": "q", "pos": ["a passage of its own"]}) + "\n")
    judged = prepare(SAMPLE, own, folder=tmp_path / "split")
    assert judged.train == str(SAMPLE) and judged.eval == str(own)
    records, corpus, relevant = _held_out(judged.eval, judged.corpus)
    assert "a passage of its own" in corpus and len(corpus) > 300
