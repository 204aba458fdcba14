"""m3lab.train.grad_cache: the same loss and gradients as FlagEmbedding's uncached step (dropout replayed),
encoder memory that does not grow with the group, the command, and a real run."""

import contextlib
import copy

import pytest
import torch

from m3lab import predict as predictor
from m3lab.command import render
from m3lab.config import M3LAB_M3_MODULE, ConfigError, TrainConfig
from m3lab.train.grad_cache import (
    GradCacheM3Model,
    _RandomState,
    chunk_rows,
    use_grad_cache,
)
from m3lab.train.sparse_head import EfficientSparseM3Model, use_efficient_sparse_head

QUERIES = ["what is a decorator", "wie bindet Python Namen an Objekte?"]
PASSAGES = ["A decorator wraps a function and returns it.", "pass", "x = 5 binds the name x.",
            "The with statement; the with statement.", "Un décorateur enveloppe une fonction.",
            "Namen werden an Objekte gebunden, nicht an Speicherplätze."]  # group of 3 per query


@pytest.fixture(scope="module")
def stand_in(standin_dir):
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(standin_dir))
    parts = EncoderOnlyEmbedderM3Runner.get_model(str(standin_dir), False, -1)  # as FlagEmbedding's runner loads it
    batch = {"queries": dict(tokenizer(QUERIES, padding=True, return_tensors="pt")),
             "passages": dict(tokenizer(PASSAGES, padding=True, return_tensors="pt"))}
    return tokenizer, parts, batch


def _flagembedding_model(stand_in, sub_batch_size=None, checkpointing=False):
    """FlagEmbedding's model as its runner builds it (self-distillation on); ``sub_batch_size`` is
    FlagEmbedding's own option to encode in pieces, with the whole graph kept."""
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )

    tokenizer, parts, _ = stand_in
    model = EncoderOnlyEmbedderM3Model(copy.deepcopy(parts), tokenizer=tokenizer, temperature=0.02,
                                       sub_batch_size=sub_batch_size, normalize_embeddings=True,
                                       unified_finetuning=True, use_self_distill=True, self_distill_start_step=-1)
    if checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model.train()  # dropout on (the stand-in's hidden and attention dropout are 0.1)


def _step(model, batch, seed=7, autocast=contextlib.nullcontext):
    torch.manual_seed(seed)
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(reference, result, rel):
    (loss_a, grads_a), (loss_b, grads_b) = reference, result
    assert torch.isfinite(loss_a) and loss_b.item() == pytest.approx(loss_a.item(), rel=rel)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, grad in grads_a.items():
        assert (grads_b[name] - grad).norm() <= rel * grad.norm() + 1e-12, name


def _worst_difference(reference, result) -> float:
    return max(((result[1][n] - g).norm() / g.norm()).item() for n, g in reference[1].items() if g.norm() > 0)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [1, 4])
def test_gradients_equal_the_uncached_step_with_the_same_dropout(stand_in, chunk, checkpointing):
    """The uncached computation with the same pieces is FlagEmbedding's sub_batch_size: each piece
    encoded with its graph, in the same order, so the same dropout masks when the RNG is replayed."""
    batch = stand_in[2]
    reference = _step(_flagembedding_model(stand_in, sub_batch_size=chunk, checkpointing=checkpointing), batch)
    cached = use_grad_cache(_flagembedding_model(stand_in, checkpointing=checkpointing), chunk)
    _assert_same(reference, _step(cached, batch), rel=1e-5)


def test_one_chunk_for_everything_is_flagembeddings_plain_step(stand_in):
    batch = stand_in[2]
    _assert_same(_step(_flagembedding_model(stand_in), batch),
                 _step(use_grad_cache(_flagembedding_model(stand_in), 100), batch), rel=1e-5)


def test_sub_batches_from_flagembeddings_collator_are_chunked_as_given(stand_in):
    """With sub_batch_size, FlagEmbedding's collator hands the model lists of tokenized pieces."""
    batch = stand_in[2]
    split = {"queries": batch["queries"],
             "passages": [{k: v[:4] for k, v in batch["passages"].items()},
                          {k: v[4:] for k, v in batch["passages"].items()}]}
    reference = _step(_flagembedding_model(stand_in), split)
    _assert_same(reference, _step(use_grad_cache(_flagembedding_model(stand_in), 4), split), rel=1e-5)


def _pieces(features: dict, rows: int) -> list[dict]:
    total = features["attention_mask"].size(0)
    return [{k: v[start:start + rows] for k, v in features.items()} for start in range(0, total, rows)]


@pytest.mark.parametrize("lengths_per_chunk", [0.5, 2, 100])
def test_token_chunks_give_the_loss_and_gradients_of_the_same_pieces_uncached(stand_in, lengths_per_chunk):
    """Chunks of about N tokens: N // the padded length texts a chunk, so queries (shorter) go more to a chunk
    than passages. The uncached reference is FlagEmbedding's own step on the batch handed over in those
    pieces (as its collator hands sub-batches), each piece encoded with its graph, in the same order."""
    batch = stand_in[2]
    query_length, passage_length = (batch[side]["input_ids"].size(1) for side in ("queries", "passages"))
    tokens = int(lengths_per_chunk * passage_length)
    rows = {side: chunk_rows(0, tokens, batch[side]["input_ids"].size(1)) for side in batch}
    if lengths_per_chunk == 2:
        assert query_length < passage_length and rows["queries"] > rows["passages"] == 2  # the point of tokens
    reference = _step(_flagembedding_model(stand_in), {side: _pieces(batch[side], rows[side]) for side in batch})
    cached = use_grad_cache(_flagembedding_model(stand_in), chunk_tokens=tokens)
    _assert_same(reference, _step(cached, batch), rel=1e-5)


def test_without_replaying_the_random_state_the_gradients_differ(stand_in, monkeypatch):
    """The control: the test above would fail if the re-encoding drew new dropout masks."""
    batch = stand_in[2]
    reference = _step(_flagembedding_model(stand_in, sub_batch_size=2), batch)
    monkeypatch.setattr(_RandomState, "replay", lambda self: contextlib.nullcontext())
    assert _worst_difference(reference, _step(use_grad_cache(_flagembedding_model(stand_in), 2), batch)) > 1e-3


def test_with_the_efficient_sparse_head_both_changes_apply(stand_in, monkeypatch):
    batch = stand_in[2]
    reference = _step(use_efficient_sparse_head(_flagembedding_model(stand_in, sub_batch_size=3)), batch)
    model = use_grad_cache(use_efficient_sparse_head(_flagembedding_model(stand_in)), 3)
    assert isinstance(model, GradCacheM3Model) and isinstance(model, EfficientSparseM3Model)
    calls = []
    original = EfficientSparseM3Model._sparse_embedding
    monkeypatch.setattr(EfficientSparseM3Model, "_sparse_embedding",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    _assert_same(reference, _step(model, batch), rel=1e-5)
    assert len(calls) == 2 * (1 + 2)  # one query chunk and two passage chunks, encoded twice


def test_the_re_encoding_runs_under_the_forwards_autocast(stand_in):
    """HF Trainer's fp16 wraps forward() in autocast, but backward() runs outside it; the re-encoding
    must use the forward's precision (bf16 here: CPU autocast)."""
    model = use_grad_cache(_flagembedding_model(stand_in), 2)
    seen = []
    model.colbert_linear.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    loss, grads = _step(model, stand_in[2], autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(loss) and grads
    assert seen == [torch.bfloat16] * 2 * (1 + 3)


def test_the_trainers_loss_scale_reaches_the_encoder(stand_in):
    """DeepSpeed and GradScaler call backward() on loss x scale; the cached gradients must be scaled
    by the same factor on their way into the (fp16) encoder graph."""
    batch = stand_in[2]
    plain = _step(use_grad_cache(_flagembedding_model(stand_in), 2), batch)
    model = use_grad_cache(_flagembedding_model(stand_in), 2)
    torch.manual_seed(7)
    (model(**batch).loss * 1024.0).backward()
    scaled = {n: p.grad / 1024.0 for n, p in model.named_parameters() if p.grad is not None}
    _assert_same(plain, (plain[0], scaled), rel=1e-5)


def test_outside_training_it_is_flagembeddings_forward(stand_in):
    model = use_grad_cache(_flagembedding_model(stand_in), 1).eval()
    with torch.no_grad():
        assert model(**stand_in[2]).loss is None


def test_bad_chunk_sizes_are_refused(stand_in):
    with pytest.raises(ValueError, match="grad_cache_chunk_size is 0"):
        use_grad_cache(_flagembedding_model(stand_in), 0)
    with pytest.raises(TypeError, match="EncoderOnlyEmbedderM3Model"):
        use_grad_cache(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="give one of them"):
        use_grad_cache(_flagembedding_model(stand_in), 2, 512)
    with pytest.raises(ConfigError, match="grad_cache_chunk_size is -1"):
        TrainConfig.common_t4_advice(grad_cache_chunk_size=-1).check()
    with pytest.raises(ConfigError, match="grad_cache_chunk_tokens is -8"):
        TrainConfig.common_t4_advice(grad_cache_chunk_tokens=-8).check()
    with pytest.raises(ConfigError, match="both size the gradient cache's chunks"):
        TrainConfig.common_t4_advice(grad_cache_chunk_size=1, grad_cache_chunk_tokens=512).check()
    with pytest.raises(ConfigError, match="with ZeRO-2 fails"):
        TrainConfig.common_t4_advice(grad_cache_chunk_size=1, deepspeed_stage=2,
                                     gradient_checkpointing=False).check()


def test_the_command_runs_m3labs_runner_with_the_flag():
    argv = render(TrainConfig.common_t4_advice(grad_cache_chunk_size=2))
    assert argv[argv.index("-m") + 1] == M3LAB_M3_MODULE
    assert argv[argv.index("--grad_cache_chunk_size") + 1] == "2"
    argv = render(TrainConfig.common_t4_advice(grad_cache_chunk_tokens=8192))
    assert argv[argv.index("-m") + 1] == M3LAB_M3_MODULE
    assert argv[argv.index("--grad_cache_chunk_tokens") + 1] == "8192" and "--grad_cache_chunk_size" not in argv


def _peak(**changes) -> int:
    """Predicted peak for one T4: fp16 through HF mixed precision, 8-bit AdamW (a low floor of model
    states, so that activations decide the peak), 4,096-token passages."""
    config = TrainConfig.common_t4_advice(deepspeed_stage=None, optim="adamw_bnb_8bit", passage_max_len=4096,
                                          efficient_sparse_head=True, **changes)
    return predictor.predict(config, "t4").peak_allocated_bytes


def _representation_bytes(rows: int, length: int) -> int:
    """fp32 bytes of ``rows`` passages' dense, sparse and ColBERT representations (the cache)."""
    vocab, hidden = 250_002, 1024
    return 4 * rows * (hidden + vocab + (length - 1) * hidden)


@pytest.mark.slow
def test_encoder_memory_does_not_grow_with_the_group():
    """From group 2 to 8 the uncached peak grows with six more passages' activations; with the cache,
    only by the cache: one fp32 copy of their representations (their gradients come and go)."""
    cached = _peak(grad_cache_chunk_size=1, train_group_size=8) - _peak(grad_cache_chunk_size=1, train_group_size=2)
    uncached = _peak(train_group_size=8) - _peak(train_group_size=2)
    extra = _representation_bytes(6, 4096)
    assert cached <= 1.1 * extra
    assert uncached > 10 * extra  # the same six passages, uncached
    # the same for the batch: 4 queries with 2 passages each instead of 1 with 2
    cached = _peak(grad_cache_chunk_size=1, train_group_size=2, per_device_train_batch_size=4) - \
        _peak(grad_cache_chunk_size=1, train_group_size=2)
    assert cached <= 1.1 * (_representation_bytes(6, 4096) + _representation_bytes(3, 64))
