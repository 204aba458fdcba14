"""LoRA on the encoder with BGE-M3's sparse and ColBERT heads trained in full (``--use_lora True``): the command, the
refusals, and real runs of the tiny stand-in: what trains, what is saved, resuming, the merged model."""

import json

import pytest
import torch

from m3lab import command
from m3lab.config import LORA_TARGETS, ConfigError, TrainConfig
from m3lab.predict.spec import spec_for

LORA = TrainConfig(model="tiny-bge-m3", train_group_size=4, query_max_len=32, passage_max_len=64,
                   per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, deepspeed_stage=None,
                   gradient_checkpointing=True,
                   use_self_distill=True, use_lora=True, lora_rank=8, lora_alpha=16, lora_dropout=0.0)


def test_the_command_takes_flagembeddings_lora_flag_names_and_reads_back():
    config = LORA.replace(model="BAAI/bge-m3", save_merged_lora_model=True)
    words = command.render(config)
    assert words[words.index("-m") + 1] == "m3lab.run_m3"
    text = " ".join(words)
    assert "--use_lora True --lora_rank 8 --lora_alpha 16 --lora_dropout 0" in text
    assert "--target_modules query key value intermediate.dense output.dense --save_merged_lora_model True" in text
    read = command.parse(words).config
    assert (read.use_lora, read.lora_rank, read.lora_alpha, read.lora_dropout, read.target_modules,
            read.save_merged_lora_model) == (True, 8, 16, 0.0, list(LORA_TARGETS), True)
    assert "--use_lora" not in " ".join(command.render(config.replace(use_lora=False, save_merged_lora_model=False)))


@pytest.mark.parametrize("changes, sentence", [
    (dict(fix_encoder=True), "fix_encoder freezes the encoder: the adapter would not train"),
    (dict(freeze_word_embeddings=True), "freeze_word_embeddings has no effect with use_lora"),
    (dict(lora_rank=0), "lora_rank is 0"),
    (dict(lora_dropout=1.0), "lora_dropout is 1.0"),
    (dict(target_modules=[]), "target_modules is empty"),
    (dict(use_lora=False, save_merged_lora_model=True), "use_lora is off: there is none"),
])
def test_what_cannot_work_is_refused_in_a_sentence(changes, sentence):
    with pytest.raises(ConfigError, match=sentence):
        LORA.replace(**changes).check()


def test_the_predictor_builds_the_adapter_the_run_trains():
    """On the meta device: the adapter on every layer's six projections and the heads train, nothing else."""
    from m3lab.predict import model_for

    full = LORA.replace(model="BAAI/bge-m3")
    model = model_for(full)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or name.startswith(("colbert_linear", "sparse_linear")) for name in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == _lora_parameters(
        8, 1024, 4096, 24) + (1024 * 1024 + 1024) + (1024 + 1)
    assert not any("pooler" in name and "lora_" in name for name, _ in model.named_parameters())
    assert spec_for(full).lora.targets == LORA_TARGETS


def test_a_lora_prediction_drops_the_encoders_gradients_and_optimizer_states():
    """Predicted for a T4, the same run with and without LoRA: the model states shrink to the adapter's."""
    from m3lab import predict

    run = LORA.replace(model="BAAI/bge-m3", fp16=True, query_max_len=64, passage_max_len=256, lora_rank=64,
                       optim="adamw_torch_fused")
    full, lora = (predict.predict(config, "t4", exact=False) for config in (run.replace(use_lora=False), run))
    full_states, lora_states = (r.per_rank[0].model_state_bytes for r in (full, lora))
    assert lora_states.trainable_params < full_states.trainable_params / 15
    # AdamW's two fp32 moments for every trainable parameter (and a step count per tensor, in the allocator's
    # 512-byte blocks); in full fine-tuning the unused pooler gets no gradient and so no state
    assert lora_states.optimizer_states == pytest.approx(8 * lora_states.trainable_params, rel=1e-3)
    assert full_states.optimizer_states == pytest.approx(8 * (full_states.trainable_params - 1024 * 1024 - 1024),
                                                         rel=1e-3)
    # the peak drops by at least the moments LoRA does not keep (and the encoder's gradients besides)
    assert full.peak_allocated_bytes - lora.peak_allocated_bytes > full_states.optimizer_states - lora_states.optimizer_states


def test_m3lab_predict_takes_a_pasted_lora_command(capsys):
    from m3lab import cli, predict

    config = LORA.replace(model="BAAI/bge-m3", fp16=True, lora_rank=64, query_max_len=64, passage_max_len=256)
    assert cli.main(["predict", "--gpu", "t4", "--json", "--", *command.render(config)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["peak_allocated_bytes"] == predict.predict(config, "t4").peak_allocated_bytes
    assert printed["spec"]["lora"] == {"rank": 64, "alpha": 16, "dropout": 0.0, "targets": list(LORA_TARGETS)}


def _lora_parameters(rank: int, hidden: int, intermediate: int, layers: int) -> int:
    """LoRA's A (rank x in) and B (out x rank) for each wrapped projection of each layer."""
    square = 4 * rank * (hidden + hidden)  # query, key, value, attention.output.dense
    feed_forward = 2 * rank * (hidden + intermediate)  # intermediate.dense, output.dense
    return layers * (square + feed_forward)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, standin_dir):
    from m3lab.train.launch import train

    return train(LORA.replace(save_steps=1, save_merged_lora_model=True), runs_root=tmp_path_factory.mktemp("runs"))


@pytest.mark.slow
def test_only_the_adapter_and_the_heads_train(lora_run, standin_dir):
    assert lora_run.status == "ok"
    geometry = json.loads((standin_dir / "config.json").read_text())
    hidden, intermediate = geometry["hidden_size"], geometry["intermediate_size"]
    heads = (hidden * hidden + hidden) + (hidden + 1)  # colbert_linear, sparse_linear
    assert lora_run.ranks[0].trainable_params == _lora_parameters(8, hidden, intermediate,
                                                                  geometry["num_hidden_layers"]) + heads
    for step in lora_run.ranks[0].steps:
        assert torch.isfinite(torch.tensor(step.loss))


@pytest.mark.slow
def test_the_saved_folder_is_an_adapter_with_both_heads_and_the_heads_trained(lora_run, standin_dir):
    from safetensors.torch import load_file

    saved = lora_run.run_dir / "model"
    for name in ("adapter_config.json", "adapter_model.safetensors", "colbert_linear.pt", "sparse_linear.pt"):
        assert (saved / name).is_file(), name
    assert not (saved / "model.safetensors").exists()  # megabytes, not the whole encoder
    adapter = load_file(saved / "adapter_model.safetensors")
    assert not any("pooler" in key for key in adapter)
    assert {key.split(".lora_")[0].split("layer.0.")[1] for key in adapter if "layer.0." in key} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense"}
    # B starts at zero: every one moved, so gradients reached every checkpointed layer's adapter
    assert all(value.abs().sum() > 0 for key, value in adapter.items() if "lora_B" in key)
    before = torch.load(standin_dir / "colbert_linear.pt", weights_only=True)
    after = torch.load(saved / "colbert_linear.pt", weights_only=True)
    assert not torch.equal(before["weight"], after["weight"])


@pytest.mark.slow
def test_the_adapter_and_the_merged_model_encode_and_score_the_same(lora_run, standin_dir):
    from transformers import AutoModel, AutoTokenizer

    from m3lab import use

    saved = lora_run.run_dir / "model"
    merged = saved / "merged_model"
    for name in ("config.json", "colbert_linear.pt", "sparse_linear.pt", "modules.json", "tokenizer_config.json"):
        assert (merged / name).exists(), name
    assert not (merged / "adapter_config.json").exists()
    query, passages = "What does the assert statement do?", ["The assert statement checks a condition.",
                                                             "Lists hold items in order."]
    # the encoder as a learner's tools load it (transformers finds the base model the adapter names)
    batch = AutoTokenizer.from_pretrained(saved)([query, *passages], padding=True, return_tensors="pt")
    with torch.no_grad():
        base, adapter, folded = (AutoModel.from_pretrained(path).eval()(**batch).last_hidden_state
                                 for path in (standin_dir, saved, merged))
    assert (adapter - base).abs().max() > 1e-3  # the adapter is loaded and changes the encoder
    torch.testing.assert_close(folded, adapter, rtol=0, atol=1e-5)  # fp32 weights: equal up to rounding
    for a, b in zip(use.score(saved, query, passages), use.score(merged, query, passages)):
        assert (a.dense, a.sparse, a.colbert) == pytest.approx((b.dense, b.sparse, b.colbert), abs=1e-5)


@pytest.mark.slow
def test_a_lora_run_resumes_from_its_checkpoint(lora_run, tmp_path):
    from m3lab.train.launch import train

    checkpoint = lora_run.run_dir / "model" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = train(LORA.replace(max_steps=2, resume_from_checkpoint=str(checkpoint)), runs_root=tmp_path)
    assert resumed.status == "ok"
    assert [step.step for step in resumed.ranks[0].steps] == [2]  # step 1 came from the checkpoint


def _wrapped_standin(standin_dir, targets=LORA_TARGETS, base_model=None):
    from types import SimpleNamespace

    from transformers import AutoModel

    from m3lab.train.lora import use_lora

    holder = SimpleNamespace(model=AutoModel.from_pretrained(standin_dir))  # FlagEmbedding's M3 model keeps it here
    use_lora(holder, 8, 16, 0.0, targets, base_model=base_model)
    return holder.model


def test_the_adapter_names_the_model_the_command_gave_not_the_folder_it_was_read_from(standin_dir, tmp_path):
    """FlagEmbedding reads BAAI/bge-m3 from its download cache; a new session has no such folder."""
    _wrapped_standin(standin_dir, base_model="BAAI/bge-m3").save_pretrained(tmp_path / "named")
    _wrapped_standin(standin_dir).save_pretrained(tmp_path / "unnamed")
    base = {name: json.loads((tmp_path / name / "adapter_config.json").read_text())["base_model_name_or_path"]
            for name in ("named", "unnamed")}
    assert base == {"named": "BAAI/bge-m3", "unnamed": str(standin_dir)}  # peft's own choice: the folder


@pytest.mark.slow
def test_resuming_loads_the_checkpoints_adapter_and_refuses_another(lora_run, standin_dir):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from m3lab.train.lora import load_adapter_weights

    checkpoint = lora_run.run_dir / "model" / "checkpoint-1"
    encoder = _wrapped_standin(standin_dir)
    load_adapter_weights(encoder, checkpoint)
    saved, loaded = load_file(checkpoint / "adapter_model.safetensors"), get_peft_model_state_dict(encoder)
    assert saved.keys() == loaded.keys()
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="holds an adapter on other layers than this run wraps"):
        load_adapter_weights(_wrapped_standin(standin_dir, targets=("query",)), checkpoint)
