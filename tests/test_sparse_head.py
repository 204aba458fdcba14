"""m3lab's O(batch x vocab) sparse head against FlagEmbedding's O(batch x seq x vocab) one:
the same loss and gradients on the stand-in, the command that runs it, its memory, a real run."""

import copy
import math

import pytest
import torch

from m3lab import predict as predictor
from m3lab.command import Rendering, render
from m3lab.config import M3LAB_M3_MODULE, TrainConfig
from m3lab.train.sparse_head import EfficientSparseM3Model, use_efficient_sparse_head


def _models(standin_dir):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(standin_dir))
    parts = EncoderOnlyEmbedderM3Runner.get_model(str(standin_dir), False, -1)  # as FlagEmbedding's runner loads it

    def build():
        return EncoderOnlyEmbedderM3Model(copy.deepcopy(parts), tokenizer=tokenizer, temperature=0.02,
                                          sub_batch_size=None, normalize_embeddings=True, unified_finetuning=True,
                                          use_self_distill=True, self_distill_start_step=0)
    return tokenizer, build(), use_efficient_sparse_head(build())


def test_same_loss_and_gradients_as_flagembeddings_head(standin_dir, monkeypatch):
    tokenizer, upstream, efficient = _models(standin_dir)
    calls = []
    original = EfficientSparseM3Model._sparse_embedding
    monkeypatch.setattr(EfficientSparseM3Model, "_sparse_embedding",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    queries = tokenizer(["what is a decorator", "wie bindet Python Namen an Objekte?"], padding=True,
                        return_tensors="pt")
    passages = tokenizer(["A decorator wraps a function and returns it.", "pass", "x = 5 binds the name x.",
                          "The with statement; the with statement."], padding=True, return_tensors="pt")
    results = []
    for model in (upstream, efficient):
        model.train()  # the training branch, dropout on: the same seed replays the same dropout
        torch.manual_seed(7)
        loss = model(queries=dict(queries), passages=dict(passages)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert calls, "the efficient head was not used"
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.isfinite(loss_a) and loss_b.item() == pytest.approx(loss_a.item(), rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and "sparse_linear.weight" in grads_a
    for name, grad in grads_a.items():
        assert (grads_b[name] - grad).norm() <= 1e-6 * grad.norm() + 1e-12, name


def test_eval_embeddings_equal_flagembeddings_eval_branch(standin_dir):
    tokenizer, upstream, efficient = _models(standin_dir)
    ids = tokenizer(["a decorator wraps a function", "pass"], padding=True, return_tensors="pt")["input_ids"]
    hidden = torch.randn(ids.shape[0], ids.shape[1], upstream.model.config.hidden_size)
    upstream.eval()
    efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(efficient._sparse_embedding(hidden, ids), upstream._sparse_embedding(hidden, ids))


def test_only_flagembeddings_model_can_be_switched():
    with pytest.raises(TypeError, match="EncoderOnlyEmbedderM3Model"):
        use_efficient_sparse_head(torch.nn.Linear(2, 2))


def test_the_command_runs_m3labs_runner_with_the_flag():
    from FlagEmbedding.finetune.embedder.encoder_only.m3 import (
        EncoderOnlyEmbedderM3DataArguments,
        EncoderOnlyEmbedderM3ModelArguments,
        EncoderOnlyEmbedderM3TrainingArguments,
    )
    from transformers import HfArgumentParser

    from m3lab.config import M3LabArguments

    # without DeepSpeed: parsing --deepspeed would register a global HF DeepSpeed config for this process
    argv = render(TrainConfig.common_t4_advice(efficient_sparse_head=True, deepspeed_stage=None),
                  Rendering("/tmp/never-used"))
    assert argv[argv.index("-m") + 1] == M3LAB_M3_MODULE
    parser = HfArgumentParser((EncoderOnlyEmbedderM3ModelArguments, EncoderOnlyEmbedderM3DataArguments,
                               EncoderOnlyEmbedderM3TrainingArguments, M3LabArguments))
    *_, m3lab_args = parser.parse_args_into_dataclasses(argv[argv.index("-m") + 2:])
    assert m3lab_args.efficient_sparse_head is True
    assert "m3lab" not in " ".join(render(TrainConfig.common_t4_advice()))  # off: FlagEmbedding's own


def test_predicted_peak_drops_without_the_seq_by_vocab_tensor(standin_dir):
    config = predictor.load_model_config(standin_dir)
    train = TrainConfig(train_group_size=4, query_max_len=32, passage_max_len=512, per_device_train_batch_size=2,
                        deepspeed_stage=0, use_self_distill=True)
    plain = predictor.predict(train, None, model_config=config)
    lean = predictor.predict(train.replace(efficient_sparse_head=True), None, model_config=config)
    seq_by_vocab = 2 * 4 * 512 * config.vocab_size * 4  # passages x tokens x vocabulary, fp32
    assert plain.peak_allocated_bytes - lean.peak_allocated_bytes >= seq_by_vocab


@pytest.mark.slow
def test_a_real_run_trains_with_the_efficient_head(tmp_path, standin_dir):
    from m3lab.train.launch import train

    result = train(TrainConfig(model="tiny-bge-m3", train_group_size=4, query_max_len=32, passage_max_len=64,
                               per_device_train_batch_size=2, max_steps=2, learning_rate=1e-4, deepspeed_stage=1,
                               reduce_bucket_size=1_000_000, use_self_distill=True, efficient_sparse_head=True),
                   runs_root=tmp_path)
    assert result.status == "ok" and all(math.isfinite(loss) for loss in result.losses)
    assert "--efficient_sparse_head True" in result.command
