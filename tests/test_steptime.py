"""Step-time estimates: the FLOPs the trace counts, held to a hand count, and the estimate's arithmetic."""

import pytest
from helpers.hf_runs import hf_run

from m3lab import predict as predictor
from m3lab.gpus import gpu_profile
from m3lab.predict import steptime

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


def test_the_step_time_is_the_counted_flops_at_the_published_rates():
    """On a T4 the fastest estimate does the step's FLOPs at the best published rate (62.99 sequences/s
    of 246.4 GFLOP each), the slowest at the worst (38.88/s)."""
    run = hf_run(batch_size=2, seq_len=128, precision="fp16")
    report = predictor.predict(run, "t4")
    estimate, flops = steptime.step_time(report), steptime.step_flops(report)
    assert estimate.fastest_seconds == pytest.approx(flops / (62.99 * 246.4e9), rel=1e-3)
    assert estimate.slowest_seconds == pytest.approx(flops / (38.88 * 246.4e9), rel=1e-3)
    assert "estimated" in steptime.describe(report) and "as published BERT-large runs on it" in steptime.describe(report)
    assert steptime.step_time(predictor.predict(run, None)) is None  # a CPU prediction


@pytest.mark.parametrize("card, datasheet_fp16_tflops", [("l4", 121), ("a100-40", 312)])
def test_a_card_without_published_runs_takes_the_t4s_shares_of_its_own_peak_and_says_so(card, datasheet_fp16_tflops):
    """The fallback: the shares the T4's published runs reached, applied to the card's datasheet
    peak, so the estimate scales as the datasheets do (65 TFLOPS for a T4)."""
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    on_t4, elsewhere = steptime.step_time(report), steptime.step_time(report, card)
    assert elsewhere.fastest_seconds == pytest.approx(on_t4.fastest_seconds * 65 / datasheet_fp16_tflops)
    assert elsewhere.slowest_seconds == pytest.approx(on_t4.slowest_seconds * 65 / datasheet_fp16_tflops)
    assert f"none is on record for {gpu_profile(card).name}" in steptime.describe(report, card)


def test_a_card_without_a_datasheet_peak_gets_no_estimate():
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    assert gpu_profile("h100").peak_flops_half is None and steptime.step_time(report, "h100") is None
    assert "no step-time estimate" in steptime.describe(report, "h100")


def test_published_t4_throughputs_are_a_quarter_of_the_datasheet_or_less():
    """BERT-large fp16 inference on a T4 at 384 tokens (NVIDIA's published table): 38.88 sequences/s
    at batch 1, 62.99 at batch 8; one forward counted by hand is 246.4 GFLOP, so 14.7% and 23.9% of
    the datasheet's 65 TFLOPS."""
    assert steptime.bert_large_forward_flops(384) == 24 * 2 * (12 * 1024**2 * 384 + 2 * 384**2 * 1024)
    assert round(steptime.bert_large_forward_flops(384) / 1e9, 1) == 246.4
    assert [round(p.utilisation, 3) for p in steptime.PUBLISHED] == [0.147, 0.239]
