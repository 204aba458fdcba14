"""Step-time estimates: the FLOPs the trace counts, held to a hand count, and the estimate's arithmetic."""

import pytest

from helpers.hf_runs import hf_run
from m3lab import predict as predictor
from m3lab import steptime
from m3lab.gpus import gpu_profile

# tests/fixtures/bert-tiny-config.json, counted by hand
HIDDEN, LAYERS, HEADS, FFN, LABELS = 64, 6, 4, 128, 2


def forward_flops(batch: int, seq: int) -> tuple[int, int]:
    """(all matrix products of one forward pass, those of the encoder layers alone): 2 FLOPs per
    multiply-add; Q, K, V, output and the two feed-forward projections, then Q K^T and A V."""
    tokens = batch * seq
    projections = 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN)
    attention = 2 * 2 * batch * seq * seq * HIDDEN
    layers = LAYERS * (projections + attention)
    heads = 2 * batch * HIDDEN * HIDDEN + 2 * batch * HIDDEN * LABELS  # pooler, classifier
    return layers + heads, layers


@pytest.mark.parametrize("checkpointing", [False, True])
def test_counted_flops_match_a_hand_count(checkpointing):
    """Backward costs two products per forward product (input and weight gradients); checkpointing
    runs each layer's forward once more."""
    run = hf_run(batch_size=2, seq_len=128, attn_implementation="eager", gradient_checkpointing=checkpointing)
    report = predictor.predict(run, None, exact=True)
    total, layers = forward_flops(2, 128)
    assert steptime.step_flops(report) == 3 * total + (layers if checkpointing else 0)


def test_step_seconds_is_flops_over_the_stated_throughput():
    run = hf_run(batch_size=2, seq_len=128, precision="fp16")
    report = predictor.predict(run, "t4")
    expected = steptime.step_flops(report) / (gpu_profile("t4").peak_flops_half * steptime.ASSUMED_UTILISATION)
    assert steptime.step_seconds(report) == pytest.approx(expected)
    assert "estimated" in steptime.describe(report)
    assert steptime.step_seconds(report, "l4") is None  # no throughput on record for it
    assert steptime.step_seconds(predictor.predict(run, None)) is None  # a CPU prediction
