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
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import EncoderOnlyEmbedderM3Runner

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
