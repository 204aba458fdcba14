import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from m3lab.data import sample
from m3lab.data.jsonl import load_jsonl

DATA = Path(__file__).resolve().parent.parent / "data"


def _rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]


def test_corpus_size_and_languages():
    corpus = _rows("corpus.jsonl")
    assert len(corpus) >= 300
    languages = Counter(p["lang"] for p in corpus)
    assert {"en", "zh", "de", "es", "fr"} <= set(languages)
    assert all(languages[lang] >= 10 for lang in ("zh", "de", "es", "fr"))


def test_splits_and_negatives():
    train, held_out = load_jsonl(DATA / "train.jsonl"), load_jsonl(DATA / "eval.jsonl")
    assert len(train) >= 200 and len(held_out) >= 50
    assert not {r["query"] for r in train} & {r["query"] for r in held_out}
    for row in train + held_out:
        assert len(row["neg"]) >= 7
        assert not set(row["neg"]) & set(row["pos"])


def test_bm25_negatives_share_terms_with_the_query():
    # Mined, not random: the hardest negative of an English query shares a term with it, except
    # for the few one-word headings ("Overview") whose term no other passage has.
    train = load_jsonl(DATA / "train.jsonl")
    english = [r for r in train if r["query"].isascii()]
    shared = sum(bool(set(sample.bm25_terms(r["query"])) & set(sample.bm25_terms(r["neg"][0])))
                 for r in english)
    assert shared >= 0.95 * len(english)


def test_chinese_terms_are_characters_and_bigrams():
    assert sample.bm25_terms("列表 list") == ["list", "列", "表", "列表"]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="pydoc_data.topics text differs between Pythons")
def test_rebuild_reproduces_committed_files(tmp_path):
    sample.build(tmp_path)
    for name in ("corpus.jsonl", "train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
