"""A run split across sessions: the checkpoint cadence with and without a step-time estimate."""

import dataclasses

import pytest
from helpers.hf_runs import hf_run

from m3lab import predict as predictor
from m3lab.config import TrainConfig
from m3lab.plan import sessions
from m3lab.plan.platforms import platform_for
from m3lab.predict import steptime


@pytest.fixture(scope="module")
def report():
    return predictor.predict(hf_run(batch_size=2, seq_len=128, precision="fp16"), "t4")


def test_with_an_estimate_a_checkpoint_lands_every_half_hour_of_the_slow_estimate(report):
    config = TrainConfig.common_t4_advice(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=1)
    slow = dataclasses.replace(steptime.step_time(report), slowest_seconds=60.0)  # a minute a step
    plan = sessions.plan(config, report, records=300, platform=platform_for("colab-t4"), time=slow)
    assert plan.steps == 600 and plan.save_steps == 30  # 30 min of one-minute steps
    assert "at most 30 min of training at the slow estimate" in "\n".join(plan.describe())


def test_a_run_shorter_than_half_an_hour_still_saves_halfway(report):
    config = TrainConfig.common_t4_advice(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=1)
    quick = dataclasses.replace(steptime.step_time(report), slowest_seconds=1.0)  # 600 steps: 10 min
    plan = sessions.plan(config, report, records=300, platform=platform_for("colab-t4"), time=quick)
    assert plan.save_steps == 300 and "halfway at the latest" in "\n".join(plan.describe())
    odd = sessions.plan(config, report, records=301, platform=platform_for("colab-t4"), time=quick)
    assert odd.steps == 602 and odd.save_steps == 301


def test_kaggles_weekly_gpu_hours_are_counted_beside_the_sessions(report):
    config = TrainConfig.common_t4_advice(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=1,
                                          num_processes=2)
    slow = dataclasses.replace(steptime.step_time(report), slowest_seconds=60.0)
    kaggle = sessions.plan(config, report, records=600, platform=platform_for("kaggle-t4x2"), time=slow)
    # 600 one-minute steps: 10 h, one session of 12 h, with its 30 min of set-up
    assert kaggle.steps == 600 and kaggle.sessions == 1
    assert ("GPU time a week: about 30 h allowed; this run takes 10.5 h of it at the slow estimate, set-up "
            "included") in kaggle.describe()
    colab = sessions.plan(config.replace(num_processes=1), report, records=300, platform=platform_for("colab-t4"),
                          time=slow)
    assert not any(line.startswith("GPU time a week") for line in colab.describe())


def test_without_an_estimate_a_checkpoint_lands_every_tenth_of_the_run_and_the_plan_says_why(report):
    config = TrainConfig.common_t4_advice(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=1)
    plan = sessions.plan(config, report, records=300, platform=platform_for("colab-t4"), time=None)
    text = "\n".join(plan.describe())
    assert plan.steps == 600 and plan.save_steps == 60
    assert "no step-time estimate for this card" in text and "min of training" not in text


def test_one_warm_up_rule_for_commands_plans_and_predictions():
    """A tenth of the optimizer steps, rounded up, as HF Trainer derives it from --warmup_ratio 0.1;
    steps given outright win."""
    config = TrainConfig.common_t4_advice(max_steps=-1, num_train_epochs=1.5, per_device_train_batch_size=2,
                                          warmup_steps=None, warmup_ratio=0.1)
    assert config.steps_per_epoch(27) == 13 and config.optimizer_steps(27) == 20  # ceil(13 x 1.5)
    assert config.warmup_steps_for(20) == 2 and config.warmup_steps_for(21) == 3
    assert config.replace(warmup_steps=7).warmup_steps_for(20) == 7
