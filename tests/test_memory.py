"""The memory predictor: its allocator model, its trace, its CLI contract, and checks of its
figures against the ZeRO paper's accounting and against real DeepSpeed."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.hf_runs import hf_run

from m3lab import predict as predictor
from m3lab.cli import main as cli_main
from m3lab.config import ConfigError, TrainConfig
from m3lab.gpus import GIB, gpu_profile
from m3lab.predict import extrapolate, prediction, steptime
from m3lab.predict.allocator import Allocator
from m3lab.predict.extrapolate import trainable_params, trainable_params_before_layers
from m3lab.predict.spec import spec_for

FIXTURES = Path(__file__).parent / "fixtures"
BERT_TINY = FIXTURES / "bert-tiny-config.json"


# ---- the caching allocator's arithmetic ------------------------------------------------------
def test_allocator_rounding_and_segments():
    assert predictor.allocator_round(1) == 512
    assert predictor.allocator_round(512) == 512
    assert predictor.allocator_round(513) == 1024
    assert predictor.segment_size(512) == 2 << 20  # small pool: 2 MiB segments
    assert predictor.segment_size(5 << 20) == 20 << 20  # 1-10 MiB: 20 MiB segments
    assert predictor.segment_size((30 << 20) + 1) == 32 << 20  # large: rounded up to 2 MiB


def test_allocator_reuses_splits_and_merges_cached_blocks():
    alloc = Allocator()
    alloc.malloc(1, 64 << 20)
    alloc.malloc(2, 64 << 20)
    assert alloc.reserved == 128 << 20
    alloc.release(1)
    alloc.malloc(3, 32 << 20)  # served from the cached 64 MiB block, split
    alloc.malloc(4, 32 << 20)  # and from its remainder
    assert alloc.reserved == 128 << 20
    alloc.release(3)
    alloc.release(4)
    alloc.malloc(5, 64 << 20)  # the two halves merged back into one 64 MiB block
    assert alloc.reserved == 128 << 20
    alloc.malloc(6, 16 << 20)  # nothing cached is free: a new segment
    assert alloc.reserved == (128 + 16) << 20


def test_allocator_splits_as_pytorchs_should_split():
    """c10/cuda/CUDACachingAllocator.cpp, should_split: a large-pool block is split only when more
    than kSmallSize (1 MiB) would remain; a small-pool block when at least kMinBlockSize (512 B)."""
    from m3lab.predict import allocator

    assert (allocator.kMinBlockSize, allocator.kSmallSize, allocator.kSmallBuffer, allocator.kLargeBuffer,
            allocator.kMinLargeAlloc, allocator.kRoundLarge) == (512, 1 << 20, 2 << 20, 20 << 20, 10 << 20, 2 << 20)
    for request, split in ((11 << 20, False), ((11 << 20) - 512, True)):  # leaving 1 MiB, or 1 MiB + 512 B
        alloc = Allocator()
        alloc.malloc(1, 12 << 20)  # a 12 MiB segment of its own (over kMinLargeAlloc), then cached
        alloc.release(1)
        alloc.malloc(2, request)
        assert alloc.blocks[2].size == (request if split else 12 << 20)
    small = Allocator()
    small.malloc(1, 1 << 20)  # the whole small 2 MiB segment's first half
    assert small.blocks[1].size == 1 << 20 and small.reserved == 2 << 20


def test_allocator_gives_its_cache_back_before_it_runs_out():
    """malloc: alloc_block fails at the limit; release_available_cached_blocks does nothing without
    max_split_size; release_cached_blocks returns every cached whole segment and alloc_block is retried."""
    alloc = Allocator(limit_bytes=100 << 20)
    alloc.malloc(1, 60 << 20)
    alloc.release(1)
    alloc.malloc(2, 80 << 20)  # the cached 60 MiB segment is too small; giving it back makes room
    assert alloc.reserved == 80 << 20 and alloc.out_of_memory is None and alloc.retries == 1
    alloc.malloc(3, 40 << 20, where="forward:encoder:mm")
    oom = alloc.out_of_memory
    assert (oom.requested_bytes, oom.allocated_bytes, oom.reserved_bytes) == (40 << 20, 80 << 20, 80 << 20)
    assert oom.short_by_bytes == 20 << 20 and oom.where == "forward:encoder:mm"


def test_a_split_segment_is_not_given_back_and_its_gap_counts():
    """release_blocks frees only blocks that are not split: a segment with a tensor in it stays, and
    its free part is the "reserved but unallocated" memory of PyTorch's message."""
    alloc = Allocator(limit_bytes=100 << 20)
    alloc.malloc(1, 30 << 20)
    alloc.malloc(2, 30 << 20)
    alloc.release(1)
    alloc.malloc(3, 12 << 20)  # best fit: the 30 MiB block, split (18 MiB left, over 1 MiB)
    assert alloc.blocks[3].segment is not alloc.blocks[2].segment and alloc.blocks[3].size == 12 << 20
    assert alloc.held == 60 << 20 and alloc.allocated == 42 << 20
    alloc.malloc(4, 48 << 20)  # 60 held + 48 > 100: nothing whole to give back
    oom = alloc.out_of_memory
    assert oom.unallocated_bytes == 18 << 20 and oom.short_by_bytes == 8 << 20
    assert alloc.peak_held == 108 << 20  # the segment opened past the limit: what the step needed


def test_allocator_serves_best_fit_lowest_address_first():
    """get_free_block: the smallest cached block that holds the request (BlockComparatorSize orders
    by size, then address)."""
    alloc = Allocator()
    for key in range(4):
        alloc.malloc(key, (12 + 2 * (key % 2)) << 20)  # 12, 14, 12, 14 MiB segments
    for key in range(4):
        alloc.release(key)
    alloc.malloc(9, 13 << 20)
    assert alloc.blocks[9].address == min(s.address for s in alloc.segments if s.size == 14 << 20)
    alloc.malloc(10, 11 << 20)
    assert alloc.blocks[10].address == min(s.address for s in alloc.segments if s.size == 12 << 20)


def test_freed_neighbours_merge_into_one_block():
    alloc = Allocator()
    alloc.malloc(1, 30 << 20)
    alloc.release(1)
    for key in (2, 3, 4):
        alloc.malloc(key, 10 << 20)  # three pieces of the one segment
    assert len(alloc.segments) == 1
    alloc.release(2)
    alloc.release(4)
    alloc.release(3)  # between two free neighbours: all three are one block again
    (pool_block,) = alloc.pools[False].blocks.values()
    assert pool_block.size == 30 << 20 and not pool_block.is_split and alloc.held == 0


# ---- the trace -----------------------------------------------------------------------------------
def _traced(trace, fused: bool):
    """The trace as a mode above FakeTensorMode, or told by FakeTensorMode itself (as predictions run)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    from m3lab.predict.trace import TracedFakeTensorMode

    stack = contextlib.ExitStack()
    if fused:
        stack.enter_context(TracedFakeTensorMode(trace))
    else:
        stack.enter_context(FakeTensorMode())
        stack.enter_context(trace)
    return stack


@pytest.mark.parametrize("fused", [True, False], ids=["told-by-fake-mode", "mode-above-fake-mode"])
def test_trace_counts_fake_tensors_by_category(fused):
    trace = predictor.MemoryTrace(rounding=False)
    with _traced(trace, fused):
        weight = torch.empty(1000, 1000)  # 4 MB
        trace.relabel([weight], "weights")
        trace.reset_peak()
        trace.enter("forward")
        hidden = weight @ weight  # 4 MB activation
        temp = hidden * 2  # 4 MB more
        del temp
        trace.enter("backward")
        grad = torch.ones_like(weight)
        trace.relabel([grad], "gradients")
    assert trace.peak == 12_000_000
    assert trace.peak_breakdown == {**dict.fromkeys(predictor.CATEGORIES, 0), "weights": 4_000_000,
                                    "activations": 8_000_000}
    assert trace.candidates[("backward", "(start)")].bytes == 8_000_000  # what is live as backward starts
    assert max(v.bytes for (phase, _), v in trace.candidates.items() if phase == "backward") == 12_000_000


def test_what_fake_mode_runs_inside_an_operation_is_not_counted():
    """native_layer_norm's fake kernel is a Python decomposition whose intermediates exist only on
    fake tensors; the trace counts its outputs alone, whether above FakeTensorMode or told by it."""
    peaks, counts = [], []
    for fused in (True, False):
        trace = predictor.MemoryTrace(rounding=False)
        with _traced(trace, fused):
            hidden = torch.empty(1000, 1000)  # 4 MB
            trace.reset_peak()
            out = torch.nn.functional.layer_norm(hidden, (1000,))
            del out
        peaks.append(trace.peak)
        counts.append(len(trace.history))
    assert peaks[0] == peaks[1] == 4_000_000 + 4_000_000 + 2 * 4_000  # input, output, mean and rstd
    assert counts[0] == counts[1]


@pytest.mark.parametrize("fused", [True, False], ids=["told-by-fake-mode", "mode-above-fake-mode"])
@pytest.mark.parametrize("gpu_autograd", [True, False])
def test_a_weight_used_twice_gets_its_gradients_added_in_place_as_on_a_gpu(gpu_autograd, fused):
    """An embedding looked up twice (queries and passages) gets two gradients. Run plainly, autograd adds
    the second into the first (measured on the H200: the word embedding's 0.95 GiB); under a dispatch
    mode it allocates the sum. The trace does the former for GPU predictions, the latter for the CPU
    meter's (which is a dispatch mode too)."""
    trace = predictor.MemoryTrace(rounding=False, gpu_autograd=gpu_autograd)
    with _traced(trace, fused):
        embedding = torch.nn.Embedding(1000, 250)  # 1 MB of weights, 1 MB per gradient
        ids = torch.zeros(2, 4, dtype=torch.long)
        loss = embedding(ids).sum() + embedding(ids).sum()
        trace.reset_peak()
        before = trace.current
        trace.enter("backward")
        loss.backward()
    gradient = 1000 * 250 * 4
    assert embedding.weight.grad is not None
    # two gradients alive at once on a GPU; a third (the sum) under a dispatch mode
    assert abs(trace.peak - before - (2 if gpu_autograd else 3) * gradient) < 100  # and a few scalars


def test_gpu_profiles():
    t4 = gpu_profile("t4")
    assert t4.usable_bytes == pytest.approx(14.74 * GIB, rel=1e-3)
    assert not t4.supports_bf16 and t4.sdpa_kernel(True) == "efficient"
    assert gpu_profile("a100-80").sdpa_kernel(True) == "flash"
    assert gpu_profile("kaggle").count == 2
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu_profile("tpu")


# ---- the CLI contract ---------------------------------------------------------------------------
def _cli_json(capsys, *args):
    assert cli_main(["predict", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_predict_json_has_the_contracted_fields(capsys):
    out = _cli_json(capsys, "--trainer", "hf", "--model-config", str(BERT_TINY), "--batch-size", "4",
                    "--seq-len", "128", "--precision", "fp16", "--optim", "adamw_torch", "--gpu", "t4")
    for key in ("peak_allocated_bytes", "predicted_reserved_bytes", "held_bytes", "context_bytes", "total_bytes",
                "usable_bytes", "spare_bytes", "fits", "out_of_memory", "breakdown", "peak_phase", "per_rank"):
        assert key in out, key
    assert set(out["breakdown"]) == {"weights", "gradients", "optimizer_states", "activations", "temporaries", "other"}
    assert out["total_bytes"] == out["held_bytes"] + out["context_bytes"]
    assert out["spare_bytes"] == out["usable_bytes"] - out["total_bytes"] and out["out_of_memory"] is None
    assert out["fits"] is True and out["provenance"] == "predicted for Tesla T4 (Colab)"
    assert out["peak_allocated_bytes"] % 512 == 0  # the allocator's rounding
    assert out["per_rank"][0]["peak_allocated_bytes"] == out["peak_allocated_bytes"]


def _expected_state_bytes(optim: str, tmp_path) -> int:
    """Optimizer state per the optimizers' own definitions, with the allocator's 512-byte rounding."""
    from transformers import AutoModelForSequenceClassification

    config = predictor.load_model_config(BERT_TINY)
    config.num_labels = 2
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    r = predictor.allocator_round
    total = 0
    for p in model.parameters():
        n = p.numel()
        if optim in ("adamw_torch", "adamw_torch_fused"):  # exp_avg, exp_avg_sq (fp32) and a step tensor
            total += 2 * r(4 * n) + r(4)
        elif optim == "adafactor":  # factored second moment for matrices (rows + columns), full for
            # vectors, and the RMS of the weights, which transformers' Adafactor keeps as a tensor
            total += (r(4 * p.shape[0]) + r(4 * p.shape[1]) if p.dim() == 2 else r(4 * n)) + r(4)
    if optim == "adamw_bnb_8bit":  # what HF Trainer's own optimizer holds after a real step on this CPU
        from transformers import Trainer, TrainingArguments

        model = AutoModelForSequenceClassification.from_config(config)
        args = TrainingArguments(output_dir=str(tmp_path), optim="adamw_bnb_8bit", report_to=[], use_cpu=True)
        optimizer = Trainer(model=model, args=args).create_optimizer()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # the quantization maps are shared
                    for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)}
        total = sum(r(nbytes) for nbytes in storages.values())
        word_embeddings = model.get_input_embeddings().weight
        assert optimizer.state[word_embeddings]["state1"].dtype == torch.float32  # HF's 32-bit override
    return total


@pytest.mark.parametrize("optim", predictor.OPTIMIZERS)
def test_each_optimizer_holds_what_it_should(capsys, optim, tmp_path):
    out = _cli_json(capsys, "--trainer", "hf", "--model-config", str(BERT_TINY), "--batch-size", "2",
                    "--seq-len", "64", "--optim", optim, "--gpu", "a100-80")
    assert out["per_rank"][0]["model_state_bytes"]["optimizer_states"] == _expected_state_bytes(optim, tmp_path)


def test_attention_kernel_follows_the_card(capsys):
    common = ["--trainer", "hf", "--model-config", str(BERT_TINY), "--seq-len", "256", "--precision", "fp16"]
    eager = _cli_json(capsys, *common, "--attn-implementation", "eager", "--gpu", "t4")
    sdpa = _cli_json(capsys, *common, "--attn-implementation", "sdpa", "--gpu", "t4")
    assert sdpa["attention_kernel"] == "efficient"
    assert sdpa["peak_allocated_bytes"] < eager["peak_allocated_bytes"]  # no (L x L) scores kept


def test_snapshot_is_readable_by_pytorchs_memory_viz(tmp_path, capsys):
    from torch.cuda import _memory_viz

    path = tmp_path / "snap.pickle"
    assert cli_main(["predict", "--trainer", "hf", "--model-config", str(BERT_TINY), "--seq-len", "64",
                     "--gpu", "t4", "--snapshot", str(path)]) == 0
    snapshot = pickle.loads(path.read_bytes())
    text = _memory_viz.trace(snapshot)
    assert "cudaMalloc" in text and "entries" in text
    assert any(e["action"] == "alloc" for e in snapshot["device_traces"][0])


# ---- extrapolation from shallow traces is exact ---------------------------------------------------
@pytest.mark.parametrize("changes", [dict(), dict(gradient_checkpointing=True), dict(precision="fp16", optim="adafactor")])
def test_extrapolated_equals_full_trace_hf(changes):
    run = hf_run(batch_size=2, seq_len=128, **changes)
    fast, full = predictor.predict(run, "t4", exact=False), predictor.predict(run, "t4", exact=True)
    assert fast.extrapolated and not full.extrapolated
    assert fast.peak_allocated_bytes == full.peak_allocated_bytes
    assert fast.breakdown == full.breakdown
    assert (fast.first_step_peak_bytes, fast.steady_step_peak_bytes) == (full.first_step_peak_bytes,
                                                                        full.steady_step_peak_bytes)
    assert steptime.step_flops(fast) == steptime.step_flops(full) > 0  # FLOPs are linear in depth too


def test_extrapolated_equals_full_trace_m3(standin_dir):
    config = predictor.load_model_config(standin_dir)
    config.num_hidden_layers = 6
    for train in (TrainConfig(deepspeed_stage=0, fp16=True, gradient_checkpointing=True, use_self_distill=True,
                              train_group_size=4, query_max_len=32, passage_max_len=256),
                  TrainConfig(deepspeed_stage=1, fp16=True, fix_encoder=True, reduce_bucket_size=10_000_000,
                              train_group_size=2, query_max_len=16, passage_max_len=512),
                  # issue 5's goal levers: gradient caching, 8-bit AdamW, the efficient sparse head
                  TrainConfig(deepspeed_stage=None, fp16=True, gradient_checkpointing=True, use_self_distill=True,
                              optim="adamw_bnb_8bit", grad_cache_chunk_size=1, efficient_sparse_head=True,
                              train_group_size=4, query_max_len=32, passage_max_len=1024,
                              per_device_train_batch_size=1)):
        fast, full = (predictor.predict(train, "t4", model_config=config, exact=False),
                      predictor.predict(train, "t4", model_config=config, exact=True))
        assert fast.extrapolated
        assert fast.peak_allocated_bytes == full.peak_allocated_bytes
        assert fast.breakdown == full.breakdown
        assert steptime.step_flops(fast) == steptime.step_flops(full) > 0


@pytest.mark.parametrize("offload", [False, True])
def test_extrapolation_with_shrunken_buckets_stays_close_to_the_full_trace(standin_dir, offload):
    """A model bigger than DeepSpeed's gradient bucket: the shallow copies get smaller buckets.
    Not exact (the step's peak may move to another operation), so held to 0.5%."""
    config = predictor.load_model_config(standin_dir)
    config.num_hidden_layers = 10
    train = TrainConfig(deepspeed_stage=1, fp16=True, gradient_checkpointing=True, train_group_size=2,
                        query_max_len=16, passage_max_len=128, reduce_bucket_size=1_000_000,
                        offload_optimizer=offload)
    assert trainable_params(spec_for(train, config))[0] > 1_000_000  # the bucket really is crossed
    fast, full = (predictor.predict(train, "t4", model_config=config, exact=False),
                  predictor.predict(train, "t4", model_config=config, exact=True))
    assert fast.extrapolated and "buckets shrunk" in fast.method
    assert fast.peak_allocated_bytes == pytest.approx(full.peak_allocated_bytes, rel=0.005)
    for key, value in dataclasses.asdict(full.per_rank[0].model_state_bytes).items():  # DeepSpeed pads its flat buffers
        assert getattr(fast.per_rank[0].model_state_bytes, key) == pytest.approx(value, rel=0.001), key


@pytest.mark.parametrize("changes, bounded", [
    (dict(), True),  # the optimizer's step peaks: the 2- and 3-layer copies stand
    (dict(passage_max_len=1024, gradient_checkpointing=False), False),  # backward peaks: deeper copies
    (dict(deepspeed_stage=2, gradient_checkpointing=False), False),
], ids=["optimizer peak", "backward peak", "ZeRO-2 backward peak"])
def test_buckets_smaller_than_the_largest_gradient_bound_backward_only(standin_dir, changes, bounded):
    """A bucket that the 2-layer copy's shrinking makes smaller than the largest gradient (the
    word embeddings, 524k elements here; 900k less 8 layers of 50k): DeepSpeed reduces that
    gradient on its own, so the copies' backward figures are upper bounds. They stand when the
    peak is elsewhere; when backward peaks, the deeper copies whose bucket holds it are traced."""
    config = predictor.load_model_config(standin_dir)
    config.num_hidden_layers = 10
    train = TrainConfig(**{**dict(deepspeed_stage=1, fp16=True, gradient_checkpointing=True, train_group_size=2,
                                  query_max_len=16, passage_max_len=128, reduce_bucket_size=900_000), **changes})
    pairs = extrapolate.shallow_specs(spec_for(train, config))
    assert [(pair.depth, pair.bounded) for pair in pairs] == [(2, True), (3, False)]
    largest = trainable_params(spec_for(train, config))[1]
    assert pairs[0].specs[0].deepspeed["zero_optimization"]["reduce_bucket_size"] < largest
    assert pairs[1].specs[0].deepspeed["zero_optimization"]["reduce_bucket_size"] >= largest
    fast, full = (predictor.predict(train, "t4", model_config=config, exact=False),
                  predictor.predict(train, "t4", model_config=config, exact=True))
    assert ("2- and 3-layer" in fast.method and "upper bound" in fast.method) == bounded, fast.method
    assert full.peak_phase == ("optimizer" if bounded else "backward")
    assert fast.peak_allocated_bytes == pytest.approx(full.peak_allocated_bytes, rel=0.005)


def test_a_plain_script_can_predict_without_a_main_guard(tmp_path):
    """The shallow copies are traced in spawned workers, which must not re-run the caller's script."""
    script = tmp_path / "sweep.py"
    script.write_text("from m3lab.config import TrainConfig\nfrom m3lab.predict import predict\n"
                      f"run = TrainConfig(trainer='hf', model={str(BERT_TINY)!r}, seq_len=64, deepspeed_stage=None)\n"
                      "print('PEAK', predict(run, 't4').peak_allocated_bytes)\n")
    env = {**os.environ, "M3LAB_PREDICT_WORKERS": "2"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("PEAK") == 1


@pytest.mark.slow
@pytest.mark.parametrize("stage, processes", [(1, 1), (2, 2)])
def test_offloaded_states_leave_the_gpu_and_equal_real_deepspeed(standin_dir, stage, processes, tmp_path):
    """With offload_optimizer the fp32 masters and Adam states are host memory: none on the GPU,
    and on the host exactly the bytes that real DeepSpeed's offloaded optimizer holds."""
    real = _real_deepspeed_states(standin_dir, stage, processes, tmp_path, offload=True)
    predicted = _predicted_states(predictor.load_model_config(standin_dir), stage, processes, offload=True)
    for got, want in zip(predicted, real):
        assert got["optimizer_states"] == 0
        assert got["offloaded_optimizer_states"] == want["optimizer_states"] > 0
        assert got["host_peak_bytes"] >= got["offloaded_optimizer_states"]
        assert got["weights"] == want["weights"]


def test_offload_lowers_the_gpu_peak_and_reports_host_memory():
    config = predictor.load_model_config(BERT_TINY)

    def predicted(offload):
        train = TrainConfig(deepspeed_stage=2, fp16=True, train_group_size=2, query_max_len=32, passage_max_len=64,
                            reduce_bucket_size=50_000_000, offload_optimizer=offload)
        return predictor.predict(train, "t4", model_config=config)

    plain, offload = predicted(False), predicted(True)
    assert offload.breakdown["optimizer_states"] == 0 < plain.breakdown["optimizer_states"]
    assert offload.peak_allocated_bytes < plain.peak_allocated_bytes
    states = plain.per_rank[0].model_state_bytes.optimizer_states
    assert offload.per_rank[0].model_state_bytes.offloaded_optimizer_states == pytest.approx(states, rel=0.01)


def test_gradient_accumulation_keeps_gradients_between_micro_batches():
    one = predictor.predict(hf_run(seq_len=128), "t4")
    two = predictor.predict(hf_run(seq_len=128, gradient_accumulation_steps=2), "t4")
    # the second micro-batch runs forward with the first one's gradients alive
    assert two.steady_step_peak_bytes > one.steady_step_peak_bytes


def test_hf_trainer_with_a_deepspeed_json(tmp_path, capsys):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(TrainConfig(deepspeed_stage=1, per_device_train_batch_size=2).deepspeed_config()))
    out = _cli_json(capsys, "--trainer", "hf", "--model-config", str(BERT_TINY), "--batch-size", "2",
                    "--seq-len", "64", "--deepspeed", str(path), "--gpu", "t4")
    # fp32 under ZeRO-1 on one GPU: weights, fp32 master partition, two moments
    states = out["per_rank"][0]["model_state_bytes"]
    assert states["optimizer_states"] == pytest.approx(3 * states["weights"], rel=0.05)


def test_a_step_that_fails_for_real_fails_in_the_prediction(standin_dir, monkeypatch):
    # Seen in a real CPU run of the stand-in too: DeepSpeed asserts "Gradient computed twice".
    config = TrainConfig(deepspeed_stage=2, gradient_checkpointing=True, train_group_size=2, query_max_len=8,
                         passage_max_len=8)
    geometry = predictor.load_model_config(standin_dir)
    with pytest.raises(ConfigError, match="Gradient computed twice"):  # TrainConfig knows, and says so first
        predictor.predict(config, "t4", model_config=geometry)
    monkeypatch.setattr(TrainConfig, "check", lambda self: None)  # the trace itself, unwarned
    with pytest.raises(predictor.TrainingWouldFail, match="Gradient computed twice"):
        predictor.predict(config, "t4", model_config=geometry)


# ---- full-size figures against the ZeRO paper's accounting ----------------------------------------
def _bge_m3_params() -> int:
    return trainable_params(spec_for(TrainConfig()))[0]


def test_full_size_parameter_count():
    # XLM-R large (~560M with the pooler) plus colbert_linear (1024x1024+1024) and sparse_linear (1025)
    assert _bge_m3_params() == pytest.approx(568e6, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize("gpus", [1, 2])
def test_zero1_model_states_match_the_zero_paper(gpus):
    """ZeRO paper, mixed-precision Adam: fp16 weights 2 bytes/param; fp32 master + two moments,
    12 bytes/param, partitioned over N ranks by stage 1."""
    psi = _bge_m3_params()
    report = predictor.predict(TrainConfig.common_t4_advice(num_processes=gpus, negatives_cross_device=gpus > 1), "t4x2")
    for rank in report.per_rank:
        assert rank.model_state_bytes.weights == pytest.approx(2 * psi, rel=0.002)
        assert rank.model_state_bytes.optimizer_states == pytest.approx(12 * psi / gpus, rel=0.002)


# ---- against real DeepSpeed ------------------------------------------------------------------------
def _real_deepspeed_states(config_path: Path, stage: int, processes: int, out_dir: Path,
                           offload: bool = False) -> list[dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    helper = Path(__file__).parent / "helpers" / "deepspeed_states.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(processes), str(helper),
                          str(config_path), str(stage), str(out_dir)] + (["offload"] if offload else []),
                         capture_output=True, text=True, env=env,
                         timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads((out_dir / f"rank-{rank}.json").read_text()) for rank in range(processes)]


def _predicted_states(model_config, stage: int, processes: int, offload: bool = False) -> list[dict]:
    train = TrainConfig(deepspeed_stage=stage, per_device_train_batch_size=1, num_processes=processes,
                        negatives_cross_device=processes > 1, train_group_size=2, query_max_len=8,
                        passage_max_len=8, offload_optimizer=offload)
    report = predictor.predict(train, None, model_config=model_config, exact=True)
    return [dataclasses.asdict(r.model_state_bytes) for r in report.per_rank]


@pytest.mark.slow
@pytest.mark.parametrize("stage, processes", [(0, 1), (1, 1), (1, 2), (2, 2)])
def test_model_states_equal_real_deepspeed_tiny(standin_dir, stage, processes, tmp_path):
    real = _real_deepspeed_states(standin_dir, stage, processes, tmp_path)
    predicted = _predicted_states(predictor.load_model_config(standin_dir), stage, processes)
    assert len(real) == len(predicted) == processes
    for got, want in zip(predicted, real):
        assert got["weights"] == want["weights"]
        assert got["optimizer_states"] == want["optimizer_states"]


@pytest.mark.fullsize
@pytest.mark.skipif(os.environ.get("M3LAB_FULLSIZE") != "1", reason="needs ~14 GB of RAM; set M3LAB_FULLSIZE=1")
def test_model_states_equal_real_deepspeed_full_size(tmp_path):
    predictor.bge_m3_config().save_pretrained(tmp_path)
    real = _real_deepspeed_states(tmp_path, 1, 1, tmp_path)
    predicted = _predicted_states(predictor.bge_m3_config(), 1, 1)
    assert predicted[0]["weights"] == real[0]["weights"]
    assert predicted[0]["optimizer_states"] == real[0]["optimizer_states"]


@pytest.mark.parametrize("free_order", ["oldest first", "newest first"])
def test_storages_freed_together_are_released_in_a_fixed_order(free_order):
    """C++ containers (autocast's cache of cast weights) free their tensors in address order, so the
    order of frees between two operations varies from run to run; the simulated allocator must not.
    Two 12 MiB blocks in two segments, freed together: the next 12 MiB block takes the same one."""
    mib = 2**20
    trace = predictor.MemoryTrace(rounding=True)
    with trace:
        a = torch.empty(12 * mib, dtype=torch.uint8)
        b = torch.empty(12 * mib, dtype=torch.uint8)
        first_segment = trace.allocator.blocks[a.untyped_storage()._cdata].segment
        if free_order == "oldest first":
            del a
            del b
        else:
            del b
            del a
        c = torch.empty(12 * mib, dtype=torch.uint8)
        assert trace.allocator.blocks[c.untyped_storage()._cdata].segment is first_segment


def test_zero0_on_two_gpus_extrapolates_with_shrunken_allreduce_chunks(standin_dir, monkeypatch):
    """ZeRO-0 all-reduces after backward in fixed chunks (5e8 elements for real; smaller here, so
    that the stand-in crosses one inside its 9th of 10 layers, as BGE-M3 does in its 20th of 24).
    DeepSpeed's own chunking, spied on: each shallow copy's first chunk is the full model's less
    the layers it lacks, and the rest is the same chunk; the peaks agree with the full trace."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    monkeypatch.setenv("M3LAB_PREDICT_WORKERS", "0")  # trace in this process, where the spy is
    config = predictor.load_model_config(standin_dir)
    config.num_hidden_layers = 10
    train = TrainConfig(deepspeed_stage=0, fp16=True, gradient_checkpointing=True, train_group_size=2,
                        query_max_len=16, passage_max_len=128, num_processes=2)
    before, per_layer = trainable_params_before_layers(spec_for(train, config))
    # the chunk is DeepSpeed's module constant, not a setting: the run's spec gets the smaller one
    monkeypatch.setattr(prediction, "spec_for", lambda *args: dataclasses.replace(
        spec_for(*args), allreduce_bucket_size=before + int(8.5 * per_layer)))
    chunks: dict[int, list[int]] = {}
    original = DeepSpeedEngine.allreduce_and_copy

    def spy(engine, small_bucket, *args, **kwargs):
        layers = engine.module.config.num_hidden_layers
        chunks.setdefault(layers, []).append(sum(t.numel() for t in small_bucket))
        return original(engine, small_bucket, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "allreduce_and_copy", spy)
    fast = predictor.predict(train, "t4x2", model_config=config, exact=False)
    full = predictor.predict(train, "t4x2", model_config=config, exact=True)
    assert fast.extrapolated and "all-reduce chunks shrunk" in fast.method
    depths = sorted(n for n in chunks if n < 10)
    full_chunks = chunks[10][:2]  # rank 0, first step
    assert len(full_chunks) == 2 and len(depths) == 2
    for n in depths:
        assert chunks[n][:2] == [full_chunks[0] - (10 - n) * per_layer, full_chunks[1]]
    for fast_rank, full_rank in zip(fast.per_rank, full.per_rank):
        assert fast_rank.peak_allocated_bytes == pytest.approx(full_rank.peak_allocated_bytes, rel=0.005)


def test_a_one_shot_prediction_forks_helpers_and_predicts_the_same(monkeypatch):
    """The command line's one prediction per process: helpers forked from it trace the copies."""
    from m3lab.predict import pool

    run = hf_run(seq_len=64, batch_size=2)
    forked = []
    monkeypatch.setattr(pool, "_forked", lambda jobs, original=pool._forked: forked.append(len(jobs)) or original(jobs))
    one_shot = predictor.predict(run, "t4", one_shot=True, exact=False).to_json()
    monkeypatch.setenv("M3LAB_PREDICT_WORKERS", "0")
    here = predictor.predict(run, "t4", exact=False).to_json()
    assert forked == [2]
    for report in (one_shot, here):
        report.pop("seconds")
    assert one_shot == here


def test_a_forked_helper_that_pytorch_refuses_is_traced_in_the_parent(monkeypatch):
    """PyTorch 2.11 (Colab's) refuses autograd in a child forked from a process that ran a backward
    (seen calling the command line in-process after tracing); the parent then traces that copy."""
    from m3lab.predict import pool

    def refused(*args, **kwargs):
        raise RuntimeError(pool.AUTOGRAD_AFTER_FORK + ". See https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork")

    def helper_started(started=pool._worker_started):  # runs in each forked helper only
        started()
        pool.simulate_rank = refused

    run = hf_run(seq_len=64, batch_size=2)
    monkeypatch.setattr(pool, "_worker_started", helper_started)
    one_shot = predictor.predict(run, "t4", one_shot=True, exact=False).to_json()
    monkeypatch.setenv("M3LAB_PREDICT_WORKERS", "0")
    here = predictor.predict(run, "t4", exact=False).to_json()
    for report in (one_shot, here):
        report.pop("seconds")
    assert one_shot == here


def test_offload_with_deepspeeds_cpu_adam_is_traced_not_run(standin_dir):
    """ZeRO offload without torch_adam builds DeepSpeedCPUAdam, whose C++ kernel read fake tensors'
    memory and crashed the process (found in notebook 08); its kernel is left out, its states traced."""
    config = predictor.load_model_config(standin_dir)
    train = TrainConfig(deepspeed_stage=1, offload_optimizer=True, torch_adam=False, fp16=True,
                        train_group_size=2, query_max_len=16, passage_max_len=64)
    report = predictor.predict(train, "t4", model_config=config, exact=True)
    assert report.host_peak_bytes > 0 and report.breakdown["optimizer_states"] == 0
