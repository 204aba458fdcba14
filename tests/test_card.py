"""The model card a fine-tuned folder goes to the hub with."""

from m3lab.data.jsonl import REPO_ROOT
from m3lab.use.card import TrainingRecord, card_text, write_model_card
from m3lab.use.evaluate import RetrievalScores

MODES = ("dense", "sparse", "colbert", "combined")


def _scores(value):
    return RetrievalScores("m", 50, 303, {m: value for m in MODES}, {m: {1: value, 10: value, 100: 1.0} for m in MODES},
                           ndcg_at_10={m: value for m in MODES})


def test_the_card_names_the_base_the_data_the_command_and_the_scores_with_their_origin(tmp_path):
    record = TrainingRecord("BAAI/bge-m3", REPO_ROOT / "data" / "train.jsonl", "torchrun ... -m m3lab.run_m3",
                            _scores(0.5), _scores(0.75), "Tesla T4 (Colab)")
    path = write_model_card(tmp_path, record)
    text = path.read_text()
    assert path.name == "README.md" and text.startswith("---\nbase_model: BAAI/bge-m3\n")
    assert "`train.jsonl`: 251 lines, sha256 `" in text and "torchrun ... -m m3lab.run_m3" in text
    assert "50 held-out queries against 303 passages, measured on Tesla T4 (Colab)" in text
    assert "combined   0.500 -> 0.750" in text and "SentenceTransformer(\"THIS_REPO\")" in text


def test_without_scores_the_card_says_they_were_not_measured():
    text = card_text(TrainingRecord("BAAI/bge-m3", REPO_ROOT / "data" / "train.jsonl", "cmd"))
    assert "## Held-out retrieval\n\nNot measured." in text
