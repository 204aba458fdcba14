"""freeze_word_embeddings: the 250,002 x 1024 matrix stays fixed, everything else trains; in the
command, in the predictor's accounting, and in a real run."""

import pytest
import torch

from m3lab import predict as predictor
from m3lab.command import render
from m3lab.config import ConfigError, TrainConfig
from m3lab.predict.extrapolate import trainable_params
from m3lab.predict.spec import spec_for

VOCAB, HIDDEN = 250_002, 1024


def test_trainable_parameters_lose_exactly_the_word_embeddings():
    full = trainable_params(spec_for(TrainConfig.common_t4_advice()))[0]
    frozen = trainable_params(spec_for(TrainConfig.common_t4_advice(
        freeze_word_embeddings=True)))[0]
    assert full - frozen == VOCAB * HIDDEN


@pytest.mark.slow
def test_optimizer_states_follow_the_trainable_parameters():
    """ZeRO paper accounting: 12 bytes of fp32 master + Adam moments per trainable parameter."""
    config = TrainConfig.common_t4_advice(freeze_word_embeddings=True)
    trainable = trainable_params(spec_for(config))[0]
    report = predictor.predict(config, "t4")
    assert report.per_rank[0].model_state_bytes.optimizer_states == pytest.approx(12 * trainable, rel=0.002)
    assert "--freeze_word_embeddings" in render(config) and "m3lab.run_m3" in render(config)


def test_freezing_inside_a_frozen_encoder_is_refused():
    with pytest.raises(ConfigError, match="freeze_word_embeddings has no effect with fix_encoder"):
        TrainConfig.common_t4_advice(freeze_word_embeddings=True, fix_encoder=True).check()


@pytest.mark.slow
def test_a_real_run_leaves_the_word_embeddings_as_they_were(tmp_path, standin_dir):
    from safetensors.torch import load_file

    from m3lab.train.launch import train

    result = train(TrainConfig(model="tiny-bge-m3", train_group_size=4, query_max_len=32, passage_max_len=64,
                               per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3, deepspeed_stage=1,
                               reduce_bucket_size=1_000_000, freeze_word_embeddings=True), runs_root=tmp_path)
    assert result.status == "ok"
    before, after = (load_file(next(path.glob("*.safetensors"))) for path in (standin_dir, result.run_dir / "model"))

    def find(weights, suffix):  # the saved model may prefix its keys differently
        return next(value for key, value in weights.items() if key.endswith(suffix))

    word = "embeddings.word_embeddings.weight"
    torch.testing.assert_close(find(after, word), find(before, word), rtol=0, atol=0)
    query = "layer.0.attention.self.query.weight"
    assert not torch.equal(find(after, query), find(before, query))  # the rest did train
