"""The predictor's faster fake-tensor cache keys: the keys PyTorch builds, value for value."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from m3lab import fake_cache_key, memory
from m3lab.config import TrainConfig


def test_agrees_with_pytorch_on_sample_arguments():
    assert fake_cache_key.builds_torch_keys()


@pytest.fixture
def compared_keys(monkeypatch):
    """Every key built during the block is also built by PyTorch's own code and compared."""
    seen = {"calls": 0, "tensor_args": 0, "mismatches": []}
    fast = fake_cache_key.cache_key_args

    def both(mode, result, args, state, id_hashed_objects):
        start = len(result)
        ours = list(result)
        fast(mode, ours, args, state, [])
        fake_cache_key._TORCH_KEY_ARGS(mode, result, args, state, id_hashed_objects)
        seen["calls"] += 1
        seen["tensor_args"] += sum(value is torch.Size for value in result[start:])  # each tensor's shape
        if ours != result and len(seen["mismatches"]) < 5:
            seen["mismatches"].append((result[start:], ours[start:]))

    # cache_key_args looks itself up for nested sequences, so those are compared too
    monkeypatch.setattr(fake_cache_key, "cache_key_args", both)
    return seen


@pytest.mark.parametrize("train", [
    # DeepSpeed ZeRO-1, fp16, gradient checkpointing (views, in-place ops, flat buffers, .data swaps)
    TrainConfig(deepspeed_stage=1, fp16=True, gradient_checkpointing=True, reduce_bucket_size=1_000_000,
                train_group_size=2, query_max_len=16, passage_max_len=64),
    # HF AMP (autocast casts), gradient caching, 8-bit AdamW (bitsandbytes), the efficient sparse head
    TrainConfig(deepspeed_stage=None, fp16=True, gradient_checkpointing=True, optim="adamw_bnb_8bit",
                grad_cache_chunk_size=1, efficient_sparse_head=True, train_group_size=2, query_max_len=16,
                passage_max_len=64, per_device_train_batch_size=1),
], ids=["zero1-fp16", "amp-grad-cache-8bit"])
def test_every_key_of_a_traced_step_equals_pytorchs(standin_dir, compared_keys, train):
    spec = memory.spec_from_config(train, model_config=memory.load_model_config(standin_dir))
    memory.predict(gpu="t4", spec=spec, exact=True)
    assert compared_keys["calls"] > 1000 and compared_keys["tensor_args"] > 1000  # the trace really went through it
    assert compared_keys["mismatches"] == []


def test_pytorchs_own_code_stays_when_the_keys_differ(monkeypatch):
    monkeypatch.setattr(fake_cache_key, "builds_torch_keys", lambda: False)
    with fake_cache_key.faster_cache_keys():
        assert FakeTensorMode._prep_args_for_hash is fake_cache_key._TORCH_KEY_ARGS


def test_installed_only_while_tracing():
    with fake_cache_key.faster_cache_keys():
        assert FakeTensorMode._prep_args_for_hash is fake_cache_key.cache_key_args
    assert FakeTensorMode._prep_args_for_hash is fake_cache_key._TORCH_KEY_ARGS
