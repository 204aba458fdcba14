"""The gradient cache beside FlagEmbedding's own step, dropout off: the same loss and gradients, less memory."""

import json

import pytest

from m3lab.evidence.side_by_side import grad_cache_side_by_side


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for line in open("data/train.jsonl", encoding="utf-8")][:2]


def test_same_loss_and_gradients_and_a_flat_peak(standin_dir, records):
    import torch

    elsewhere = torch.zeros(2**26)  # 256 MiB the process holds for other reasons: not the step's
    small, big = (grad_cache_side_by_side(str(standin_dir), records, group=g) for g in (2, 8))
    assert big.plain.peak_bytes < elsewhere.nbytes
    for result in (small, big):
        assert result.cached.loss == pytest.approx(result.plain.loss, rel=1e-6)
        assert result.gradient_difference < 1e-5 and result.parameters_compared > 10
    # FlagEmbedding's step keeps every passage's activations; the cached one a chunk's
    assert big.plain.peak_bytes > 2 * small.plain.peak_bytes
    assert big.cached.peak_bytes < 1.2 * small.cached.peak_bytes < big.plain.peak_bytes
