"""The model at the end: its folder, loaded by FlagEmbedding's BGEM3FlagModel, used with its three heads."""

import math

from m3lab import use


def test_a_saved_model_is_loaded_and_scores_with_its_three_heads(standin_dir):
    names = [f.name for f in use.model_files(standin_dir)]
    assert "colbert_linear.pt" in names and "sparse_linear.pt" in names and "config.json" in names
    rows = use.score(standin_dir, "What does the assert statement do?",
                     ["The assert statement checks a condition.", "Lists hold items in order."])
    assert [row.passage[:10] for row in rows] == ["The assert", "Lists hold"]
    for row in rows:
        assert all(math.isfinite(value) for value in (row.dense, row.sparse, row.colbert, row.combined))
        assert abs(row.combined - (0.4 * row.dense + 0.2 * row.sparse + 0.4 * row.colbert)) < 1e-9


def test_the_push_command_names_the_repository_and_the_folder():
    assert use.push_command("/content/drive/MyDrive/bge m3", "me/bge-m3-mine") == \
        "hf upload me/bge-m3-mine '/content/drive/MyDrive/bge m3' . --repo-type model"


def test_full_precision_reaches_the_child_that_loads_the_model(tmp_path, monkeypatch):
    """On a GPU, scores are in fp16 unless asked otherwise: a request's full_precision must reach the loader."""
    import json

    seen = []
    monkeypatch.setattr(use, "_score_here", lambda *args: seen.append(args[-1]) or [])
    for asked in (True, False):
        request = tmp_path / "request.json"
        request.write_text(json.dumps({"query": "q", "passages": ["p"], "full_precision": asked}))
        assert use.main(["model", str(request), str(tmp_path / "out.json")]) == 0
    request.write_text(json.dumps({"query": "q", "passages": ["p"]}))  # as written before the field existed
    use.main(["model", str(request), str(tmp_path / "out.json")])
    assert seen == [True, False, False]
