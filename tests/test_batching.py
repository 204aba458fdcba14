"""Which texts share a batch, as FlagEmbedding's own datasets draw them (m3lab.data.batching)."""

import json

import pytest

from m3lab.data.batching import query_as_trained, sample_batches
from m3lab.standin import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()[0]


@pytest.fixture()
def two_files(tmp_path):
    records = [json.loads(line) for line in open("data/train.jsonl", encoding="utf-8")][:40]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:20]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[20:]))
    return [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]


def test_same_dataset_batches_come_from_one_file_and_mixed_ones_do_not(two_files, tokenizer):
    same = sample_batches(two_files, tokenizer, same_dataset=True, batch_size=4, count=8)
    assert all(len(batch.files) == 1 and sum(batch.files.values()) == 4 for batch in same)
    mixed = sample_batches(two_files, tokenizer, same_dataset=False, batch_size=4, count=8)
    assert any(len(batch.files) == 2 for batch in mixed)
    assert all(sum(batch.files.values()) == 4 for batch in mixed)


def test_flagembedding_prefixes_none_to_queries_without_an_instruction(two_files, tokenizer):
    """FlagEmbedding 1.4.2's same-dataset path formats a missing instruction as the text "None"; an
    empty instruction leaves the query as written. If this fails, FlagEmbedding changed: update
    notebook 03 and the note in m3lab.predict.paste."""
    query = json.loads(two_files[0].read_text().splitlines()[0])["query"]
    assert query_as_trained(two_files[:1], tokenizer, same_dataset=True, first_query=query) == "None" + query
    assert query_as_trained(two_files[:1], tokenizer, same_dataset=True, first_query=query, instruction="") == query
    assert query_as_trained(two_files[:1], tokenizer, same_dataset=False, first_query=query) == query


def test_no_progress_bars_in_the_output_and_datasets_left_as_found(tokenizer, two_files, capfd):
    import datasets

    assert not datasets.are_progress_bars_disabled()
    sample_batches(two_files, tokenizer, same_dataset=False, count=1)
    assert "Generating train split" not in capfd.readouterr().err  # new files: datasets did generate them
    assert not datasets.are_progress_bars_disabled()
