"""Step-time estimates: the FLOPs the trace counts, held to a hand count, and the estimate's arithmetic."""

import dataclasses

import pytest
from helpers.hf_runs import hf_run

from m3lab import predict as predictor
from m3lab.data.jsonl import LineLengths
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


def test_the_step_time_is_the_counted_flops_at_the_anchors_shares():
    """On a T4 the slowest estimate does the step's FLOPs at the training anchor's lowest share of the
    65 TFLOPS datasheet peak (13.1%), the fastest at inference's best (62.99 sequences/s of 246.4 GFLOP:
    23.9%), which bounds the training anchor's highest (26.2%)."""
    run = hf_run(batch_size=2, seq_len=128, precision="fp16")
    report = predictor.predict(run, "t4")
    estimate, flops = steptime.step_time(report), steptime.step_flops(report)
    assert estimate.fastest_seconds == pytest.approx(flops / (62.99 * 246.4e9), rel=1e-3)
    assert estimate.slowest_seconds == pytest.approx(flops / (0.1306 * 65e12), rel=1e-3)
    assert estimate.padded_share is None and "every text at full length (an upper bound)" in estimate.describe()
    assert "a published training run on a T4, bounded by published inference" in steptime.describe(report)
    assert steptime.step_time(predictor.predict(run, None)) is None  # a CPU prediction


@pytest.mark.parametrize("card, datasheet_fp16_tflops", [("l4", 121), ("a100-40", 312)])
def test_a_card_without_published_runs_takes_the_t4s_shares_of_its_own_peak_and_says_so(card, datasheet_fp16_tflops):
    """The fallback: the shares reached on a T4, applied to the card's datasheet peak, so the
    estimate scales as the datasheets do (65 TFLOPS for a T4)."""
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    on_t4, elsewhere = steptime.step_time(report), steptime.step_time(report, card)
    assert elsewhere.fastest_seconds == pytest.approx(on_t4.fastest_seconds * 65 / datasheet_fp16_tflops)
    assert elsewhere.slowest_seconds == pytest.approx(on_t4.slowest_seconds * 65 / datasheet_fp16_tflops)
    assert f"none is on record for {gpu_profile(card).name}" in steptime.describe(report, card)


def test_a_card_without_a_datasheet_peak_gets_no_estimate():
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    assert gpu_profile("h100").peak_flops_half is None and steptime.step_time(report, "h100") is None
    assert "no step-time estimate" in steptime.describe(report, "h100")


def test_the_anchors_by_hand():
    """NVIDIA's BERT-large fp16 inference on a T4 at 384 tokens: 38.88 sequences/s at batch 1, 62.99
    at batch 8; one forward counted by hand is 246.4 GFLOP, so 14.7% and 23.9% of 65 TFLOPS.
    Unsloth's BGE-M3 LoRA run: 834 steps of 256 pairs in 1,220.381 s, each step a forward and an
    input-gradient backward; pairs padded to 8/32 tokens give 12.1 TFLOP a step at 8.3 TFLOP/s
    (13.1%), to 16/64 tokens 24.9 TFLOP at 17.0 TFLOP/s (26.2%)."""
    assert steptime.bert_large_forward_flops(384) == 24 * 2 * (12 * 1024**2 * 384 + 2 * 384**2 * 1024)
    assert round(steptime.bert_large_forward_flops(384) / 1e9, 1) == 246.4
    training, *inference = steptime.ANCHORS
    assert training.basis is steptime.Basis.TRAINING and all(a.basis is steptime.Basis.INFERENCE for a in inference)
    assert [round(a.shares[0], 3) for a in inference] == [0.147, 0.239]
    assert [round(s, 3) for s in training.shares] == [0.131, 0.262]
    low, high, on = steptime.shares("t4")
    assert (round(low, 3), round(high, 3), on) == (0.131, 0.239, None)  # the T4's own figures
    assert steptime.shares("t4x2")[2] is None and steptime.shares("l4")[2] == "Tesla T4"


def _line(query, pos, neg):
    return LineLengths(query, tuple(pos), tuple(neg))


def test_a_batch_pads_to_its_longest_text_not_to_the_max_length():
    """Lines whose texts are all 100 tokens pad to 104 (a multiple of 8), not to a max of 512; the
    share is the encoder's FLOPs there over those at the max lengths, by hand."""
    lines = [_line(10, [100], [100, 100, 100])]
    share = steptime.padded_share(lines, batch=2, group=4, query_max_len=64, passage_max_len=512)
    f = steptime.bert_large_forward_flops
    assert share == pytest.approx((f(16) + 4 * f(104)) / (f(64) + 4 * f(512)))
    # a text longer than the max length is cut there: the share is then 1
    assert steptime.padded_share([_line(80, [900], [900])], 1, 2, 64, 512) == pytest.approx(1.0)


def test_one_long_negative_makes_the_whole_group_pad_to_it():
    """FlagEmbedding draws group - 1 of a line's negatives: with one long one among many short, a
    group of 2 rarely draws it, a group of 8 (all seven) always does."""
    lines = [_line(8, [50], [50] * 6 + [2000])]
    small = steptime.padded_share(lines, 1, 2, 8, 2048)
    large = steptime.padded_share(lines, 1, 8, 8, 2048)
    f = steptime.bert_large_forward_flops
    assert large == pytest.approx((f(8) + 8 * f(2000)) / (f(8) + 8 * f(2048)))
    assert 0.05 < small < 0.4  # the long one in about one group in seven


def test_the_data_lowers_the_step_time_and_says_so():
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    full = steptime.step_time(report)
    m3 = dataclasses.replace(report, spec=dataclasses.replace(report.spec, batch_size=1, train_group_size=2,
                                                               query_max_len=64, passage_max_len=512))
    padded = steptime.step_time(m3, lines=[_line(10, [100], [100])])
    assert padded.padded_share < 0.3 and padded.slowest_seconds == pytest.approx(full.slowest_seconds * padded.padded_share)
    assert "at the lengths your data's batches pad to" in padded.describe()


def test_two_gpus_add_the_gradients_exchange_at_the_slow_end_only():
    """568M trainable parameters' fp32 gradients (2.27 GB) over two T4s at 5 GB/s: 0.45 s a step."""
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    states = dataclasses.replace(report.per_rank[0].model_state_bytes, trainable_params=568_000_000)
    two = dataclasses.replace(report, spec=dataclasses.replace(report.spec, num_gpus=2),
                              per_rank=[dataclasses.replace(report.per_rank[0], model_state_bytes=states)])
    one, both = steptime.step_time(report), steptime.step_time(two)
    assert both.exchange_seconds == pytest.approx(568e6 * 4 / 5e9)
    assert both.fastest_seconds == pytest.approx(one.fastest_seconds)
    assert both.slowest_seconds == pytest.approx(one.slowest_seconds + 0.4544, rel=1e-3)
    assert "0.5 s for the gradients' exchange" in both.describe()


def test_kaggles_t4s_use_the_t4s_own_figures():
    report = predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")
    kaggle = steptime.step_time(report, "t4x2")
    assert kaggle.borrowed_from is None and "none is on record" not in kaggle.describe()
