"""A recipe per platform: the card says what to run and what it costs, each figure labelled, and its
command, pasted back into ``m3lab predict --``, describes the very configuration that was predicted."""

import pytest

from m3lab import recipes, steptime
from m3lab.command import parse as parse_command


@pytest.fixture(scope="module")
def kaggle_stock():
    return recipes.recipe("kaggle-t4x2", stock=True)


def test_card_names_the_platform_and_labels_every_figure(kaggle_stock):
    card = kaggle_stock.card()
    assert card.startswith("## Kaggle: 2 x Tesla T4, 29.0 GB host RAM; FlagEmbedding as it is")
    assert "GPU, predicted for 2 x Tesla T4 (Kaggle)" in card and "host, predicted:" in card
    assert "estimated at 15% to 24% of its datasheet peak" in card
    assert "torchrun --standalone --nproc_per_node 2" in card  # two T4s, two processes


def test_card_command_is_the_predicted_configuration(kaggle_stock):
    best = kaggle_stock.fitted.best
    command = kaggle_stock.card().split("\n\n")[1]  # the JSON, if any, follows after a blank line
    pasted = parse_command(command).config
    # warmup is written as steps and read back as a ratio (memory does not depend on it)
    assert pasted.replace(train_data=best.config.train_data, warmup_ratio=best.config.warmup_ratio,
                          warmup_steps=None) == best.config
    assert best.config.negatives_cross_device  # shared across the two GPUs, as m3.sh runs it
    assert steptime.step_time(best.report).fastest_seconds > 0


def test_deepspeed_card_prints_the_json_its_command_names():
    fitted = recipes.recipe("colab-t4", stock=True).fitted
    zero1 = recipes.Recipe(fitted)
    # the recipe as found may not use DeepSpeed; swap in a ZeRO-1 configuration to check the card's JSON
    best = fitted.best
    best.config = best.config.replace(deepspeed_stage=1, optim="adamw_torch")
    card = zero1.card()
    assert "--deepspeed ds_stage1.json" in card
    assert "# ds_stage1.json (write it beside the command)" in card and '"stage": 1' in card


def test_card_without_the_hosts_ram_says_it_was_not_checked(kaggle_stock):
    """``m3lab fit --gpu t4`` (no --platform, no --host-ram-gib) prints the same card: the host's
    figure stands alone, labelled unchecked."""
    import dataclasses

    fitted = dataclasses.replace(kaggle_stock.fitted, platform=dataclasses.replace(
        kaggle_stock.fitted.platform, host_ram_bytes=None))
    figures = recipes.Recipe(fitted).figures()
    assert "host, predicted: " in figures and "(the host's RAM was not given: not checked)" in figures
