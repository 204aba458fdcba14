"""The predictor's fake-tensor cache keys: PyTorch's keys, value for value, except where a tensor
sits in its storage for operations that neither alias nor mutate; checked by PyTorch's own
cache cross-check and by whole predictions made both ways."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from m3lab import predict as predictor
from m3lab.config import TrainConfig
from m3lab.predict import fake_cache_key


@pytest.fixture(autouse=True)
def _traced_here(monkeypatch):
    """These tests look inside the trace (the fake-tensor cache's counters, its keys): every prediction
    traces afresh, none is read back from the saved traces (tests/conftest.py, for tests that patch)."""


def test_agrees_with_pytorch_on_sample_arguments():
    assert fake_cache_key.builds_torch_keys()


@pytest.fixture
def compared_keys(monkeypatch):
    """Every key built during the block is also built by PyTorch's own code and compared."""
    seen = {"calls": 0, "tensor_args": 0, "mismatches": []}
    fast = fake_cache_key.cache_key_args
    # decided once a process, before the spy below swaps in PyTorch's keys (with them, views do not share
    # entries, and the check would say so for every later test)
    fake_cache_key.builds_torch_keys(), fake_cache_key.places_views_right()

    def both(mode, result, args, state, id_hashed_objects):
        start = len(result)
        ours = list(result)
        placement_free = fake_cache_key._placement_free
        fake_cache_key._placement_free = False  # the other tests check leaving placement out
        try:
            fast(mode, ours, args, state, [])
        finally:
            fake_cache_key._placement_free = placement_free
        fake_cache_key._TORCH_KEY_ARGS(mode, result, args, state, id_hashed_objects)
        seen["calls"] += 1
        seen["tensor_args"] += sum(value is torch.Size for value in result[start:])  # each tensor's shape
        if ours != result and len(seen["mismatches"]) < 5:
            seen["mismatches"].append((result[start:], ours[start:]))

    # cache_key_args looks itself up for nested sequences, so those are compared too
    monkeypatch.setattr(fake_cache_key, "cache_key_args", both)
    return seen


TRAINING = pytest.mark.parametrize("train", [
    # DeepSpeed ZeRO-1, fp16, gradient checkpointing (views, in-place ops, flat buffers, .data swaps)
    TrainConfig(deepspeed_stage=1, fp16=True, gradient_checkpointing=True, reduce_bucket_size=1_000_000,
                train_group_size=2, query_max_len=16, passage_max_len=64),
    # HF AMP (autocast casts), gradient caching, 8-bit AdamW (bitsandbytes), the efficient sparse head
    TrainConfig(deepspeed_stage=None, fp16=True, gradient_checkpointing=True, optim="adamw_bnb_8bit",
                grad_cache_chunk_size=1, efficient_sparse_head=True, train_group_size=2, query_max_len=16,
                passage_max_len=64, per_device_train_batch_size=1),
    # ZeRO-1 with the optimizer offloaded: host and device tensors
    TrainConfig(deepspeed_stage=1, fp16=True, offload_optimizer=True, reduce_bucket_size=1_000_000,
                train_group_size=2, query_max_len=16, passage_max_len=64),
], ids=["zero1-fp16", "amp-grad-cache-8bit", "zero1-offload"])


@TRAINING
def test_every_key_of_a_traced_step_equals_pytorchs_with_placement(standin_dir, compared_keys, train):
    predictor.predict(train, "t4", model_config=predictor.load_model_config(standin_dir), exact=True)
    assert compared_keys["calls"] > 1000 and compared_keys["tensor_args"] > 1000  # the trace really went through it
    assert compared_keys["mismatches"] == []


@TRAINING
def test_every_cache_hit_equals_a_fresh_dispatch(standin_dir, train):
    """PyTorch's cross-check recomputes each hit without the cache and compares the metadata."""
    import torch._dynamo.config

    hits = FakeTensorMode.cache_hits
    geometry = predictor.load_model_config(standin_dir)
    with torch._dynamo.config.patch(fake_tensor_cache_crosscheck_enabled=True):
        predictor.predict(train, "t4", model_config=geometry, exact=True)  # raises on the first mismatch
    assert FakeTensorMode.cache_hits - hits > 1000


def _deeper(standin_dir, layers):
    config = predictor.load_model_config(standin_dir)
    config.num_hidden_layers = layers
    return config


@pytest.mark.parametrize("exact", [True, False], ids=["full trace", "extrapolated"])
def test_predictions_are_the_same_with_pytorchs_keys(standin_dir, monkeypatch, exact):
    train = TrainConfig(deepspeed_stage=1, fp16=True, gradient_checkpointing=True, reduce_bucket_size=1_000_000,
                        train_group_size=2, query_max_len=16, passage_max_len=128)
    geometry = _deeper(standin_dir, 6)
    monkeypatch.setenv("M3LAB_PREDICT_WORKERS", "0")  # traced here, where the patch below applies
    ours = predictor.predict(train, "t4", model_config=geometry, exact=exact).to_json()
    monkeypatch.setattr(fake_cache_key, "builds_torch_keys", lambda: False)
    monkeypatch.setattr(fake_cache_key, "UNGUARD_DISPATCH", False)  # PyTorch's guarded dispatch too
    FakeTensorMode.cache.clear()
    theirs = predictor.predict(train, "t4", model_config=geometry, exact=exact).to_json()
    for report in (ours, theirs):
        report.pop("seconds")
    assert ours == theirs


def test_pytorchs_own_code_stays_when_the_keys_differ(monkeypatch):
    monkeypatch.setattr(fake_cache_key, "builds_torch_keys", lambda: False)
    with pytest.warns(RuntimeWarning, match="cache keys differ"), fake_cache_key.faster_dispatch():
        assert FakeTensorMode._prep_args_for_hash is fake_cache_key._TORCH_KEY_ARGS
        assert FakeTensorMode._cache_key is fake_cache_key._TORCH_CACHE_KEY


def test_installed_only_while_tracing():
    guarded = FakeTensorMode.__torch_dispatch__
    with fake_cache_key.faster_dispatch():
        assert FakeTensorMode._prep_args_for_hash is fake_cache_key.cache_key_args
        assert FakeTensorMode._cache_key is fake_cache_key.cache_key
        # the same dispatch, without PyTorch's no-compile guard around it
        assert FakeTensorMode.__torch_dispatch__ is guarded.__wrapped__
    assert FakeTensorMode._prep_args_for_hash is fake_cache_key._TORCH_KEY_ARGS
    assert FakeTensorMode._cache_key is fake_cache_key._TORCH_CACHE_KEY
    assert FakeTensorMode.__torch_dispatch__ is guarded


def test_the_memory_trace_has_no_no_compile_guard():
    from torch.utils._python_dispatch import TorchDispatchMode

    assert not hasattr(predictor.MemoryTrace.__torch_dispatch__, "__wrapped__")

    class Guarded(TorchDispatchMode):  # what PyTorch does to a mode that does not opt out
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert hasattr(Guarded.__torch_dispatch__, "__wrapped__")


def test_only_operations_that_neither_alias_nor_mutate_leave_placement_out():
    aten = torch.ops.aten
    assert not fake_cache_key._aliases_or_mutates(aten.mm.default)
    assert not fake_cache_key._aliases_or_mutates(aten._to_copy.default)
    for func in (aten.view.default, aten.narrow.default, aten.as_strided.default, aten.detach.default,
                 aten.add_.Tensor, aten.copy_.default, aten.add.out, aten.set_.source_Storage_storage_offset):
        assert fake_cache_key._aliases_or_mutates(func), func


def test_a_view_hit_sits_where_its_own_input_sits():
    """Views of tensors at different offsets share one cache entry (the key leaves the placement
    out) and each output lands at its own input's offset plus the view's shift."""
    mode = FakeTensorMode()
    with fake_cache_key.faster_dispatch(), mode:
        flat = torch.empty(1000)
        first, second = flat[10:70], flat[300:360]  # the same shape at two offsets
        cases = [
            (lambda t: t.view(6, 10), 0),
            (lambda t: t.view(6, 10).t(), 0),
            (lambda t: t.view(6, 10)[2:4], 20),
            (lambda t: t.view(6, 10).select(0, 3), 30),
            (lambda t: torch.ops.aten.as_strided.default(t, (5, 5), (5, 1)), 0),
            (lambda t: t.detach(), 0),
            (lambda t: t.split(20)[2], 40),
        ]
        for view, shift in cases:
            view(first)
            hits = FakeTensorMode.cache_hits
            out = view(second)
            assert out.storage_offset() == 300 + shift
            assert FakeTensorMode.cache_hits > hits  # the second input's view came from the cache
            assert out.untyped_storage()._cdata == flat.untyped_storage()._cdata
            assert view(first).storage_offset() == 10 + shift
        # as_strided with an offset puts its output there, wherever the input sits
        assert torch.ops.aten.as_strided.default(second, (5,), (1,), 7).storage_offset() == 7
        assert torch.ops.aten.as_strided.default(first, (5,), (1,), 7).storage_offset() == 7
        # view(dtype) rescales the offset, so it keeps PyTorch's keys
        assert first.view(torch.int16).storage_offset() == 20 and second.view(torch.int16).storage_offset() == 600


def test_slices_of_one_length_share_an_entry_and_land_at_their_start():
    """DeepSpeed's flat buffers: the same length sliced at ever new starts. Inside the input, a
    slice is keyed by its length and placed at its own start; other slices keep their own keys."""
    aten = torch.ops.aten
    mode = FakeTensorMode()
    with fake_cache_key.faster_dispatch(), mode:
        flat = torch.empty(1000)
        grid = flat[100:700].view(20, 30)  # offset 100, strides (30, 1)
        cases = [  # (input, dim, starts, end - start, step, offset of each start's output)
            (flat, 0, (3, 250, 990), 10, 1, lambda start: start),
            (grid, 1, (2, 11), 12, 1, lambda start: 100 + start),
            (grid, 0, (1, 7), 6, 2, lambda start: 100 + 30 * start),
            (grid, -1, (4, 9), 8, 1, lambda start: 100 + start),
        ]
        for tensor, dim, starts, length, step, offset in cases:
            reference = aten.slice.Tensor(tensor, dim, starts[0], starts[0] + length, step)
            for start in starts[1:]:
                hits = FakeTensorMode.cache_hits
                out = aten.slice.Tensor(tensor, dim, start, start + length, step)
                assert FakeTensorMode.cache_hits == hits + 1  # from the entry the first start made
                assert out.storage_offset() == offset(start)
                assert (out.shape, out.stride()) == (reference.shape, reference.stride())
        # ends past the input, negative starts and open ends are PyTorch's own keys, clamped as it clamps
        assert fake_cache_key._slice_start(aten.slice.Tensor, (flat, 0, 995, 1005)) is None
        assert fake_cache_key._slice_start(aten.slice.Tensor, (flat, 0, -5, 1000)) is None
        assert fake_cache_key._slice_start(aten.slice.Tensor, (flat, 0, 5, 2**63 - 1)) is None
        assert flat[995:1005].shape == (5,) and flat[990:1000].shape == (10,)
        assert flat[-5:].storage_offset() == 995 and flat[-5:].shape == (5,)
        assert aten.slice.Tensor(grid, 1, 25, 2**63 - 1).storage_offset() == 125


def test_only_shifting_views_leave_placement_out_and_stay_relative():
    aten = torch.ops.aten
    assert fake_cache_key._placement_free_key(aten.mm.default, (), {})
    assert fake_cache_key._placement_free_key(aten.slice.Tensor, (), {})
    assert not fake_cache_key._placement_free_key(aten.view.dtype, (), {})
    assert not fake_cache_key._placement_free_key(aten.add_.Tensor, (), {})
    assert not fake_cache_key._placement_free_key(aten.as_strided.default, (None, (1,), (1,)), {"storage_offset": 3})
    assert fake_cache_key._relative(aten.as_strided.default, (None, (1,), (1,)))
    assert not fake_cache_key._relative(aten.as_strided.default, (None, (1,), (1,), 3))
    assert not fake_cache_key._relative(aten.view_as_real.default, (None,))


def test_views_keep_pytorchs_keys_and_entries_where_the_check_fails(monkeypatch):
    from m3lab.predict import fake_cache_key as keys

    assert keys.places_views_right()
    monkeypatch.setattr(keys, "places_views_right", lambda: False)
    with keys.faster_dispatch():
        assert FakeTensorMode._get_output_tensor_from_cache_entry is keys._TORCH_OUTPUT_TENSOR
        assert FakeTensorMode._cache_key is keys.cache_key  # the other keys stay
        assert not keys._placement_free_key(torch.ops.aten.view.default, (), {})
        assert keys._placement_free_key(torch.ops.aten.mm.default, (), {})
