"""The predictor against real runs: the same configurations of the tiny stand-in, trained for
real on this CPU by FlagEmbedding's trainer under torchrun, and predicted on fake tensors.

Real runs pad each batch to its longest text, so the data here makes every text longer than its
max length: then the real batches have exactly the shapes the predictor assumes.
"""

import json

import pytest
from helpers.hf_runs import hf_run

from m3lab import predict as predictor
from m3lab.config import TrainConfig
from m3lab.train.launch import train

pytestmark = pytest.mark.slow

BASE = TrainConfig(model="tiny-bge-m3", train_group_size=4, query_max_len=32, passage_max_len=64,
                   per_device_train_batch_size=2, max_steps=2, learning_rate=1e-4, deepspeed_stage=1,
                   reduce_bucket_size=1_000_000, use_self_distill=True)
CONFIGS = {
    "ZeRO-0, 1 process": BASE.replace(deepspeed_stage=0),
    "ZeRO-1, 1 process": BASE,
    "ZeRO-1 + gradient checkpointing": BASE.replace(gradient_checkpointing=True),
    "ZeRO-1, 2 processes": BASE.replace(num_processes=2, negatives_cross_device=True),
    # issue 5's levers, each through m3lab.run_m3
    "ZeRO-1 + grad cache + checkpointing + efficient sparse head": BASE.replace(
        grad_cache_chunk_size=2, gradient_checkpointing=True, efficient_sparse_head=True),
    "no DeepSpeed, 8-bit AdamW, grad cache": BASE.replace(deepspeed_stage=None, optim="adamw_bnb_8bit",
                                                          grad_cache_chunk_size=3),
    # issue 33's gradient cache by tokens: 4 queries (32 tokens) or 2 passages (64) a chunk
    "no DeepSpeed, grad cache by tokens": BASE.replace(deepspeed_stage=None, grad_cache_chunk_tokens=128),
    # issue 33's LoRA: the encoder frozen, the adapter (with its dropout) and both heads trained
    "ZeRO-1 + LoRA + checkpointing": BASE.replace(use_lora=True, lora_rank=8, gradient_checkpointing=True),
    "no DeepSpeed, LoRA with dropout, grad cache": BASE.replace(deepspeed_stage=None, use_lora=True, lora_rank=4,
                                                                lora_dropout=0.1, grad_cache_chunk_size=2),
}


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    from m3lab.data.jsonl import load_jsonl

    path = tmp_path_factory.mktemp("data") / "long.jsonl"
    rows = load_jsonl("data/train.jsonl")[:40]
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps({"query": (row["query"] + " ") * 12,
                                     "pos": [(text + " ") * 6 for text in row["pos"]],
                                     "neg": [(text + " ") * 6 for text in row["neg"]]}) + "\n")
    return path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_predicted_live_tensor_peak_within_2_percent_of_measured(name, long_data, standin_dir, tmp_path):
    config = CONFIGS[name].replace(train_data=[str(long_data)])
    measured = train(config, runs_root=tmp_path)
    assert measured.status == "ok"
    predicted = predictor.predict(config, None, model_config=predictor.load_model_config(standin_dir), exact=True)
    assert len(predicted.per_rank) == len(measured.ranks) == config.num_processes
    for rank, prediction in zip(measured.ranks, predicted.per_rank):
        first, steady = (s.peak_allocated_bytes for s in rank.steps)
        assert prediction.first_step.peak_allocated_bytes == pytest.approx(first, rel=0.02)
        assert prediction.steady_step.peak_allocated_bytes == pytest.approx(steady, rel=0.02)


# ---- plain transformers.Trainer (the predictor's "hf" trainer) ----------------------------------
HF_CASES = {
    "adamw_torch": ("adamw_torch", False),
    "adafactor": ("adafactor", False),
    "adamw_torch + gradient checkpointing": ("adamw_torch", True),
    "adamw_bnb_8bit": ("adamw_bnb_8bit", False),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_hf_trainer_prediction_within_2_percent_of_measured(name, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from m3lab.train.launch import _read_ranks

    optim, checkpointing = HF_CASES[name]
    config_path = Path(__file__).parent / "fixtures" / "bert-tiny-config.json"
    helper = Path(__file__).parent / "helpers" / "hf_trainer_run.py"
    argv = [sys.executable, str(helper), str(config_path), str(tmp_path), optim, "4", "128"]
    run = subprocess.run(argv + (["checkpointing"] if checkpointing else []), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = [s.peak_allocated_bytes for s in _read_ranks(tmp_path)[0].steps]
    run = hf_run(config_path, batch_size=4, seq_len=128, optim=optim, gradient_checkpointing=checkpointing)
    predicted = predictor.predict(run, None, exact=True)
    assert predicted.per_rank[0].first_step.peak_allocated_bytes == pytest.approx(measured[0], rel=0.02)
    assert predicted.per_rank[0].steady_step.peak_allocated_bytes == pytest.approx(measured[1], rel=0.02)
