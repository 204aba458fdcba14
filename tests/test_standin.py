import hashlib

import pytest
import torch

from m3lab import standin


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_is_deterministic(tmp_path, standin_dir):
    rebuilt = standin.build(tmp_path / "again")
    assert _digests(rebuilt) == _digests(standin_dir)


def test_has_bge_m3_files_and_special_tokens(standin_dir):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in standin_dir.iterdir()}
    assert {"config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json"} <= names
    tokenizer = AutoTokenizer.from_pretrained(standin_dir)
    assert (tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert tokenizer.mask_token_id == len(tokenizer) - 1
    ids = tokenizer("列表 Liste list")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    config = AutoConfig.from_pretrained(standin_dir)
    assert config.model_type == "xlm-roberta"
    assert config.max_position_embeddings == standin.BGE_M3_CONFIG["max_position_embeddings"]
    assert config.vocab_size == len(tokenizer)


def test_flagembedding_loads_it_with_its_heads(standin_dir):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )

    parts = EncoderOnlyEmbedderM3Runner.get_model(str(standin_dir))
    saved = torch.load(standin_dir / "colbert_linear.pt", weights_only=True)
    assert torch.equal(parts["colbert_linear"].weight, saved["weight"])
    assert parts["sparse_linear"].out_features == 1


def test_choosing_the_model_is_one_argument(standin_dir):
    assert standin.resolve_model(standin.STANDIN) == str(standin_dir)
    assert standin.resolve_model("BAAI/bge-m3") == "BAAI/bge-m3"


def test_build_refuses_an_existing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        standin.build(tmp_path / "x")


def test_a_build_that_another_process_finishes_first_is_no_error(tmp_path, monkeypatch):
    """Two processes building the same stand-in (the GPU check's runs and tests side by side, seen on the
    H200): the one that loses the race keeps the winner's folder and leaves no staging folder behind."""
    real_load = standin._load_tokenizer
    target = tmp_path / "cache" / f"{standin.STANDIN}-{standin._cache_key()}"

    def load_while_another_process_finishes(folder):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")  # the other process's finished build
        return real_load(folder)

    monkeypatch.setattr(standin, "_load_tokenizer", load_while_another_process_finishes)
    assert standin.standin_path(tmp_path / "cache") == target
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [target.name]
    assert [p.name for p in target.iterdir()] == ["config.json"]


# Written down from transformers 4.57.6 (CI's lock); the Colab lane runs this under transformers 5.15
SAMPLE = "列表 Liste list. The quick brown fox; ¿Qué pasa? Überprüfung 数据集"
SAMPLE_IDS = [0, 5, 3989, 3988, 1369, 77, 3, 22, 1239, 2742, 345, 64, 1463, 49, 342, 128, 47, 58, 5, 3, 2478, 375,
              598, 1019, 69, 1680, 5, 3, 237, 194, 373, 3664, 871, 5, 2897, 3901, 2]


def test_the_tokenizer_gives_the_same_ids_on_every_transformers_major(standin_dir):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(standin_dir)(SAMPLE)["input_ids"] == SAMPLE_IDS


def test_the_shipped_tokenizer_is_what_its_recipe_writes(tmp_path):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        with pytest.raises(SystemExit, match="under transformers 4"):
            standin.write_tokenizer(tmp_path / "tokenizer")
        return
    written = standin.write_tokenizer(tmp_path / "tokenizer")
    assert _digests(written) == {name: digest for name, digest in _digests(standin.TOKENIZER_DIR).items()}
